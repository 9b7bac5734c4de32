"""The twenty binary next-token tasks on Python code of Gao et al. 2025 ("Weight-sparse
transformers have interpretable circuits"), as prompt-pair generators.

Each item is a prompt (``clean``) with a correct and an incorrect next token, and the
counterpart prompt (``corrupted``) that differs as little as the task allows and whose
correct answer is the other one, so an item also serves patching
(:mod:`nnobs.data.tasks`). Items alternate which of the two answers is correct.

Answers are whole pre-tokens of a byte-level BPE (its pre-tokenizer never joins punctuation
to a word, so ``.add`` is the answer ``.`` followed by ``add``, and a line's indentation is
the newline plus all but one of its spaces: ``"\\n   "`` starts a line indented by 4). The
tokenizer kind ``bpe_tasks`` makes every answer of :data:`PYTHON_TASKS` one token
(:func:`~nnobs.data.tokenizer.train_bpe` with ``reserved``); on another tokenizer
:func:`load_python_task` names the answers that are not.

Held-out items are separate from training items by construction: an item's split is a hash
of its two prompts (one item in five is held out), and every prompt a generator writes has
one counterpart only, so no prompt of one split is a prompt of the other, for every ``n``
and ``seed``. Where the paper gives only a task's name, the definition here is the most
natural reading of it; each task's ``description`` states the definition used.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask, PromptPair, Task, encode_task

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 5  # one item in five is held out
N_ITEMS = 64

# Generator: rng -> (prompt answered by a, prompt answered by b, a, b)
Generator = Callable[[random.Random], tuple[str, str, str, str]]

# fmt: off
_NAMES = ["x", "y", "data", "result", "value", "items", "name", "key", "path", "text", "line",
          "item", "count", "node", "args", "parts", "out", "entry", "obj", "buf"]
_SHORT = ["a", "b", "i", "j", "k", "n", "x", "y"]  # swap and copy answers: " a", " b", ...
_HANDLES = ["f", "fp", "fh", "src", "dst"]
_WORDS = ["hello", "name", "value", "data", "error", "path", "text", "default", "none", "true",
          "file", "world", "id", "type", "mode", "size", "start", "end", "index"]
_FUNCS = ["f", "g", "len", "str", "int", "list", "sorted", "get", "run", "max"]
_CLASSES = ["Node", "Parser", "Config", "Item", "Reader", "Stack", "Point", "Cache"]
_INDENTS = ["", "    "]
_DEFS = ["main", "load", "parse", "check", "build", "update", "handle", "process", "read", "step"]
# fmt: on


def _nested(rng: random.Random, *snippets: str) -> tuple[str, ...]:
    """The snippets as they are, or each as the body of the same function (a prompt space
    large enough for held-out items)."""
    if rng.random() < 0.25:
        return snippets
    head = f"def {rng.choice(_DEFS)}({rng.choice(_NAMES)}):\n    "
    return tuple(head + snippet.replace("\n", "\n    ") for snippet in snippets)


@dataclass(frozen=True)
class PythonTask:
    name: str
    description: str
    answers: tuple[str, ...]  # every answer the generator can give
    generate: Generator


def _quote(rng: random.Random) -> tuple[str, str, str, str]:
    ind, name, word = rng.choice(_INDENTS), rng.choice(_NAMES), rng.choice(_WORDS)
    form = rng.choice(["{i}{n} = {q}{w}", "{i}print({q}{w}", "{i}return {q}{w}"])
    a, b = (form.format(i=ind, n=name, q=q, w=word) for q in ('"', "'"))
    return a, b, '"', "'"


def _final_kwarg(rng: random.Random) -> tuple[str, str, str, str]:
    f = rng.choice(_FUNCS)
    first, second, last = rng.sample(_NAMES, 3)
    keywords = f"{f}({first}={first}, {second}={second}, {last}"
    positional = f"{f}({first}, {second}, {last}"
    a, b = _nested(rng, keywords, positional)
    return a, b, "=", ")"


def _set_or_string(fixed: bool) -> Generator:
    def gen(rng: random.Random) -> tuple[str, str, str, str]:
        name = "current" if fixed else rng.choice(_NAMES)
        other, word = rng.choice([n for n in _NAMES if n != name]), rng.choice(_WORDS)
        body = f"\nfor {other} in {word}s:\n    {name}"
        return f"{name} = set(){body}", f'{name} = ""{body}', ".", " +="

    return gen


def _class_init(rng: random.Random) -> tuple[str, str, str, str]:
    cls, method = rng.choice(_CLASSES), rng.choice(_DEFS)
    base = rng.choice(["", "(object)", "(Base)", "(dict)"])
    head = f"class {cls}{base}:\n    "
    return f"{head}def {method}(", f"{head}pass\ndef {method}(", "self", ")"


def _with_as(rng: random.Random) -> tuple[str, str, str, str]:
    name = rng.choice(_NAMES)
    a, b = _nested(rng, f"with open({name})", f"if exists({name})")
    return a, b, " as", ":"


def _bracket_brace(rng: random.Random) -> tuple[str, str, str, str]:
    target, k, v = rng.sample(_NAMES, 3)
    return f"{target} = {{{k}: [{v}", f"{target} = [{{{k}: {v}", "]", "}"


def _with_open(rng: random.Random) -> tuple[str, str, str, str]:
    path, handle = rng.sample(_HANDLES, 2)
    prompt = "with open({p}) as {h}:\n    data ="
    a, b = _nested(rng, prompt.format(p=path, h=handle), prompt.format(p=handle, h=path))
    return a, b, f" {handle}", f" {path}"


def _bracket_counting(rng: random.Random) -> tuple[str, str, str, str]:
    ind, name = rng.choice(_INDENTS), rng.choice(_NAMES)
    a, b = rng.sample(_NAMES + [str(k) for k in range(10)], 2)
    return f"{ind}{name} = [[{a}, {b}", f"{ind}{name} = [{a}, {b}", "]]", "]"


def _for_while(rng: random.Random) -> tuple[str, str, str, str]:
    name = rng.choice(_NAMES)
    a, b = _nested(rng, f"for {name}", f"while {name}")
    return a, b, " in", ":"


def _else_elif(rng: random.Random) -> tuple[str, str, str, str]:
    var, out = rng.sample(_SHORT, 2)
    head = f"if {var} > 0:\n    {out} = 1\n"
    a, b = _nested(rng, f"{head}elif", f"{head}else")
    return a, b, f" {var}", ":"


def _fstring_brace(rng: random.Random) -> tuple[str, str, str, str]:
    word, name, f = rng.choice(_WORDS), rng.choice(_NAMES), rng.choice(_FUNCS)
    return f'print({f}(f"{word} {{{name}', f'print({f}("{word}", {name}', "}", ")"


def _if_ternary(rng: random.Random) -> tuple[str, str, str, str]:
    target, value, cond = rng.sample(_NAMES, 3)
    return f"{target} = {value} if {cond}", f"{target} = {value}\nif {cond}", " else", ":"


def _var_swap(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.sample(_SHORT, 2)
    first, second = _nested(rng, f"{a}, {b} = {b},", f"{b}, {a} = {a},")
    return first, second, f" {a}", f" {b}"


def _indent_for(rng: random.Random) -> tuple[str, str, str, str]:
    depth, name, seq = rng.choice([0, 4]), rng.choice(_NAMES), rng.choice(_NAMES)
    ind = " " * depth
    deeper, same = "\n" + " " * (depth + 3), "\n" + " " * max(0, depth - 1)
    return f"{ind}for {name} in {seq}s:", f"{ind}{name} = {seq}", deeper, same


def _lambda_func(rng: random.Random) -> tuple[str, str, str, str]:
    f, arg = rng.choice(_FUNCS), rng.choice(_SHORT)
    a, b = _nested(rng, f"{f} = lambda {arg}", f"def {f}({arg}")
    return a, b, ":", ")"


def _if_equals(rng: random.Random) -> tuple[str, str, str, str]:
    name = rng.choice(_NAMES)
    head = f"def {rng.choice(_DEFS)}({name}):\n    "
    return f"{head}if {name}", f"{head}{name}", " ==", " ="


def _enumerate_range(rng: random.Random) -> tuple[str, str, str, str]:
    i, x = rng.sample(_SHORT, 2)
    head = f"{x} = None\n"  # both prompts name both variables (prompts never repeat)
    a, b = _nested(rng, f"{head}for {i}, {x} in", f"{head}for {i} in")
    return a, b, " enumerate", " range"


def _var_if(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.sample(_SHORT, 2)
    f = rng.choice(_FUNCS)
    return f"{a} = {f}({b})\nif", f"{b} = {f}({a})\nif", f" {a}", f" {b}"


def _while_return_true(rng: random.Random) -> tuple[str, str, str, str]:
    head = f"def {rng.choice(_DEFS)}({rng.choice(_NAMES)}):\n    "
    return f"{head}while True", f"{head}return True", ":", "\n"


_LINE_STARTS = tuple("\n" + " " * n for n in (0, 3, 7))
PYTHON_TASKS: dict[str, PythonTask] = {
    t.name: t
    for t in [
        PythonTask("single_double_quote", "close a string with the quote that opened it: "
                   "\" vs '", ('"', "'"), _quote),
        PythonTask("final_kwarg", "after keyword arguments the last argument is one too "
                   "(f(a=a, b=b, c → '='), after positional ones the call closes (')')",
                   ("=", ")"), _final_kwarg),
        PythonTask("set_or_string", "a set grows by .add, a string by +=: '.' vs ' +=' after "
                   "the variable", (".", " +="), _set_or_string(False)),
        PythonTask("set_or_string_fixedvarname", "set_or_string with the variable always "
                   "named current", (".", " +="), _set_or_string(True)),
        PythonTask("class_init", "a method in a class body takes self first; a function "
                   "after the class takes nothing here: 'self' vs ')'", ("self", ")"), _class_init),
        PythonTask("with_as", "with open(...) binds a name (' as'); an if ends with ':'",
                   (" as", ":"), _with_as),
        PythonTask("bracket_brace", "close the innermost open bracket: ']' vs '}'",
                   ("]", "}"), _bracket_brace),
        PythonTask("with_open", "data is read from the name 'with open(path) as' bound, "
                   "not from the path (the two names swap in the counterpart)",
                   tuple(f" {h}" for h in _HANDLES), _with_open),
        PythonTask("bracket_counting", "close a list by its nesting depth: ']]' vs ']'",
                   ("]]", "]"), _bracket_counting),
        PythonTask("for_while", "'for x' continues ' in', 'while x' ends with ':'",
                   (" in", ":"), _for_while),
        PythonTask("else_elif", "elif takes a condition (the variable the if tested), else "
                   "a ':'", (":", *(f" {n}" for n in _SHORT)), _else_elif),
        PythonTask("fstring_brace", "inside an f-string's {name} comes '}', inside a call "
                   "')'", ("}", ")"), _fstring_brace),
        PythonTask("if_ternary", "an if inside an expression continues ' else', a statement "
                   "if ends with ':'", (" else", ":"), _if_ternary),
        PythonTask("var_swap", "a, b = b, → ' a' (a swap), not ' b'",
                   tuple(f" {n}" for n in _SHORT), _var_swap),
        PythonTask("indent_for", "the line after 'for ...:' is indented 4 more; after a "
                   "plain statement the indentation stays (newline plus all but one space)",
                   _LINE_STARTS, _indent_for),
        PythonTask("lambda_func", "lambda x ends its parameters with ':', def f(x with ')'",
                   (":", ")"), _lambda_func),
        PythonTask("if_equals", "after 'if x' comes ' ==', after a statement's 'x' ' ='",
                   (" ==", " ="), _if_equals),
        PythonTask("enumerate_range", "for i, x in → ' enumerate'; for i in → ' range'",
                   (" enumerate", " range"), _enumerate_range),
        PythonTask("var_if", "the if after an assignment tests the variable just assigned",
                   tuple(f" {n}" for n in _SHORT), _var_if),
        PythonTask("while_return_true", "'while True' ends with ':', 'return True' with a "
                   "newline", (":", "\n"), _while_return_true),
    ]
}  # fmt: skip

# Every answer of every task: what the ``bpe_tasks`` tokenizer keeps as single tokens.
ANSWER_PIECES: tuple[str, ...] = tuple(
    sorted({answer for task in PYTHON_TASKS.values() for answer in task.answers})
)


def split_of(pair: PromptPair) -> str:
    """``"heldout"`` for one item in :data:`HELDOUT_EVERY`, else ``"train"``: a hash of the
    item's two prompts, so an item and its mirror (prompts swapped) share a split."""
    key = "\0".join(sorted((pair.clean, pair.corrupted))).encode("utf-8")
    held = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % HELDOUT_EVERY == 0
    return SPLITS[1] if held else SPLITS[0]


def python_task(name: str, split: str = "train", n: int = N_ITEMS, seed: int = 0) -> Task:
    """``n`` distinct items of task ``name`` from ``split``, the same for the same arguments;
    items alternate which answer is correct. Fewer than ``n`` only if the task's templates
    run out (``source["n_generated"]`` says how many)."""
    if name not in PYTHON_TASKS:
        raise NnobsError(f"unknown Python task {name!r}: choose one of {', '.join(PYTHON_TASKS)}")
    if split not in SPLITS:
        raise NnobsError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    task = PYTHON_TASKS[name]
    rng = random.Random(f"{name}:{seed}")
    seen: set[PromptPair] = set()
    pairs: list[PromptPair] = []
    for _ in range(200 * n):  # bounded: a small template space cannot loop forever
        if len(pairs) == n:
            break
        first, second, a, b = task.generate(rng)
        pair = (
            PromptPair(first, second, a, b)
            if len(pairs) % 2 == 0
            else (PromptPair(second, first, b, a))
        )
        if pair not in seen and split_of(pair) == split:
            seen.add(pair)
            pairs.append(pair)
    source = {"kind": "python_task", "split": split, "seed": seed, "n_generated": len(pairs)}
    return Task(name, pairs, source)


def answers_not_single(name: str, tokenizer: Any) -> list[str]:
    """The answers of task ``name`` that ``tokenizer`` does not encode as one token."""
    return [a for a in PYTHON_TASKS[name].answers if len(tokenizer.encode(a)) != 1]


def load_python_task(
    name: str,
    tokenizer: Any,
    split: str = "train",
    n: int = N_ITEMS,
    seed: int = 0,
    *,
    equal_length: bool = False,
    align: str | None = None,
) -> EncodedTask:
    """Task ``name`` encoded for ``tokenizer`` (an :class:`~nnobs.data.tasks.EncodedTask`);
    refused in one line, naming them, if any of its answers is not a single token. With
    ``equal_length`` (position-wise patching) items whose two prompts differ in token length
    are dropped unless ``align`` says how to line them up."""
    task = python_task(name, split, n, seed)
    bad = answers_not_single(name, tokenizer)
    if bad:
        pieces = "; ".join(
            f"{a!r} is {[tokenizer.token_str(i) for i in tokenizer.encode(a)]}" for a in bad
        )
        raise NnobsError(
            f"task {name!r} needs single-token answers, and with this tokenizer {pieces}: "
            "train the model with train.tokenizer = 'bpe_tasks'"
        )
    return encode_task(
        task, tokenizer, equal_length=equal_length, align=align, strict=not equal_length
    )
