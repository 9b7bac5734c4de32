"""Prompt-pair tasks: a clean prompt, a minimally different corrupted prompt, and the two
answer tokens whose logit difference is the task metric.

A task file is JSON lines, one item per line::

    {"clean": "x = 'abc", "corrupted": "x = \\"abc", "correct": "'", "incorrect": "\\""}

``correct`` is right for the clean prompt and ``incorrect`` for the corrupted one. Both
answers must be single tokens of the model's vocabulary. Position-wise patching needs the
two prompts of an item to have the same number of tokens, or an explicit alignment.

Built-in tasks are generated deterministically from Python code templates (see
``BUILTIN``). Their answers depend on the tokenizer (``]]`` is one token of a code BPE but
two bytes to a byte tokenizer), so each task lists forms in order of preference and uses
the first whose answers are single tokens; items whose prompts tokenise to different
lengths are dropped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError

FIELDS = ("clean", "corrupted", "correct", "incorrect")
ALIGNMENTS = ("left", "right")
N_BUILTIN_ITEMS = 64


@dataclass(frozen=True)
class PromptPair:
    clean: str
    corrupted: str
    correct: str
    incorrect: str


@dataclass
class Task:
    name: str
    pairs: list[PromptPair]
    source: dict  # {"kind": "builtin", "form": ...} or {"kind": "file", "path", "sha256"}


@dataclass
class EncodedTask:
    """A task in token ids for one tokenizer. ``kept`` indexes the task's original items."""

    name: str
    source: dict
    clean: list[list[int]]
    corrupted: list[list[int]]
    correct: list[int]
    incorrect: list[int]
    kept: list[int]
    n_candidates: int
    tokenizer: str  # fingerprint
    align: str | None = None
    token_strs: list[list[str]] = field(default_factory=list)  # clean prompts, for plot labels
    corrupted_strs: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clean)

    def groups(self) -> list[list[int]]:
        """Item indices grouped by (clean length, corrupted length): each group stacks into
        one batch without padding."""
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (c, k) in enumerate(zip(self.clean, self.corrupted, strict=True)):
            by_shape.setdefault((len(c), len(k)), []).append(i)
        return list(by_shape.values())

    def subset(self, indices: Sequence[int]) -> EncodedTask:
        """The items at ``indices`` (positions in this task), e.g. those of one length."""
        pick = list(indices)
        for i in pick:
            if not 0 <= i < len(self):
                raise NnobsError(f"item {i} is out of range: the task has {len(self)} items")
        if not pick:
            raise NnobsError(f"no items selected from task {self.name!r}")
        per_item = [f.name for f in dataclasses.fields(self) if f.type.startswith("list[")]
        return dataclasses.replace(
            self, **{name: [getattr(self, name)[i] for i in pick] for name in per_item}
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "n_items": len(self),
            "n_candidates": self.n_candidates,
            "tokenizer": self.tokenizer,
            "align": self.align,
        }


# ------------------------------------------------------------------------- files


def read_task_file(path: str | Path) -> Task:
    """Read a JSON-lines task file (blank lines are skipped, extra keys ignored)."""
    path = Path(path)
    if not path.is_file():
        raise NnobsError(
            f"task {str(path)!r} not found: give a built-in task ({', '.join(BUILTIN)}) "
            "or a JSON-lines file"
        )
    raw = path.read_bytes()
    pairs = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise NnobsError(f"task file {str(path)!r} line {lineno} is not valid JSON: {e}") from e
        if not isinstance(item, dict):
            raise NnobsError(f"task file {str(path)!r} line {lineno} must be a JSON object")
        for key in FIELDS:
            if not isinstance(item.get(key), str) or not item[key]:
                raise NnobsError(
                    f"task file {str(path)!r} line {lineno}: {key!r} must be a non-empty string "
                    f"(each item has {', '.join(FIELDS)})"
                )
        pairs.append(PromptPair(*(item[key] for key in FIELDS)))
    if not pairs:
        raise NnobsError(
            f"task file {str(path)!r} has no items: write one JSON object per line with "
            f"{', '.join(FIELDS)}"
        )
    source = {
        "kind": "file",
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    return Task(path.stem, pairs, source)


def write_task_file(task: Task, path: str | Path) -> None:
    """Write ``task`` as JSON lines (e.g. to start a custom task from a built-in one)."""
    from nnobs.core.files import write_text

    lines = [json.dumps({key: getattr(p, key) for key in FIELDS}) for p in task.pairs]
    write_text(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------- encoding


def _single_token(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 else None


def _pieces(tokenizer: Any, text: str) -> list[str]:
    return [tokenizer.token_str(i) for i in tokenizer.encode(text)]


def encode_task(
    task: Task,
    tokenizer: Any,
    *,
    equal_length: bool = True,
    align: str | None = None,
    strict: bool = True,
) -> EncodedTask:
    """Tokenise ``task`` and check it can be used.

    Answers must be single tokens; with ``equal_length`` (position-wise patching) the two
    prompts of each item must have the same number of tokens unless ``align`` says how to
    line them up (``"left"``: from the first token, ``"right"``: from the last). With
    ``strict`` a bad item is an error naming it; otherwise it is dropped and counted
    (built-in tasks), and only an empty result is an error.
    """
    if align is not None and align not in ALIGNMENTS:
        raise NnobsError(f"unknown alignment {align!r}: use one of {', '.join(ALIGNMENTS)}")
    out = EncodedTask(
        task.name,
        task.source,
        [],
        [],
        [],
        [],
        [],
        len(task.pairs),
        getattr(tokenizer, "fingerprint", type(tokenizer).__name__),
        align,
    )
    first_problem = None
    for i, pair in enumerate(task.pairs):
        problem = None
        ids = {key: tokenizer.encode(getattr(pair, key)) for key in FIELDS}
        for key in ("correct", "incorrect"):
            if len(ids[key]) != 1 and problem is None:
                problem = (
                    f"task {task.name!r} item {i}: {key} answer {getattr(pair, key)!r} tokenises "
                    f"to {len(ids[key])} tokens {_pieces(tokenizer, getattr(pair, key))}; answers "
                    "must be single tokens of the model's vocabulary"
                )
        if problem is None and ids["correct"] == ids["incorrect"]:
            problem = (
                f"task {task.name!r} item {i}: correct and incorrect are the same token "
                f"{pair.correct!r}; the logit difference would always be 0"
            )
        for key in ("clean", "corrupted"):
            if problem is None and not ids[key]:
                problem = f"task {task.name!r} item {i}: the {key} prompt is empty"
        n_clean, n_corr = len(ids["clean"]), len(ids["corrupted"])
        if problem is None and equal_length and align is None and n_clean != n_corr:
            problem = (
                f"task {task.name!r} item {i}: the clean prompt has {n_clean} tokens but the "
                f"corrupted prompt has {n_corr}; position-wise patching needs equal lengths: "
                "make them equal or choose an alignment (--align left|right)"
            )
        if problem is not None:
            if strict:
                raise NnobsError(problem)
            first_problem = first_problem or problem
            continue
        out.clean.append(ids["clean"])
        out.corrupted.append(ids["corrupted"])
        out.correct.append(ids["correct"][0])
        out.incorrect.append(ids["incorrect"][0])
        out.kept.append(i)
        out.token_strs.append([tokenizer.token_str(t) for t in ids["clean"]])
        out.corrupted_strs.append([tokenizer.token_str(t) for t in ids["corrupted"]])
    if not out.clean:
        raise NnobsError(f"no usable items in task {task.name!r}: {first_problem}")
    return out


# ------------------------------------------------------------------------- built-in tasks

# fmt: off
_NAMES = ["x", "y", "data", "result", "value", "items", "name", "key", "path", "text", "line",
          "item", "count", "node", "args", "parts", "out", "entry", "obj", "buf"]
_WORDS = ["hello", "name", "value", "data", "error", "path", "text", "default", "none", "true",
          "file", "world", "id", "type", "mode", "size", "utf-8", "start", "end", "index"]
_FUNCS = ["f", "g", "len", "str", "int", "list", "sorted", "get", "run", "max"]
# fmt: on
_INDENTS = ["", "    ", "        "]

# A form: (answers for the clean prompt (correct, incorrect), generator rng -> (clean, corrupted))
Form = tuple[tuple[str, str], Callable[[random.Random], tuple[str, str]]]


def _quote(q: str, other: str) -> Form:
    def gen(rng: random.Random) -> tuple[str, str]:
        ind, name, word = rng.choice(_INDENTS), rng.choice(_NAMES), rng.choice(_WORDS)
        template = rng.choice(
            [
                "{i}{n} = {q}{w}",
                "{i}print({q}{w}",
                "{i}{n}[{q}{w}",
                "{i}return {q}{w}",
                "{i}if {n} == {q}{w}",
            ]
        )
        return tuple(template.format(i=ind, n=name, q=x, w=word) for x in (q, other))

    return (q, other), gen


def _depth(nested: bool, closer: str) -> Form:
    """``x = [[a, b`` needs ``]]``; ``x = f[a, b`` (same length, depth 1) needs ``]``."""

    def gen(rng: random.Random) -> tuple[str, str]:
        ind, name, func = rng.choice(_INDENTS), rng.choice(_NAMES), rng.choice(_FUNCS[:2])
        a, b = rng.sample(_NAMES + [str(k) for k in range(10)], 2)
        deep, flat = f"{ind}{name} = [[{a}, {b}{closer}", f"{ind}{name} = {func}[{a}, {b}{closer}"
        return (deep, flat) if nested else (flat, deep)

    return gen


def _bracket_forms() -> list[list[Form]]:
    # Preferred: the `]]` vs `]` choice itself. Where `]]` is not one token, the prompt ends
    # after the inner `]` and the choice is `]` (still inside a list) vs a newline.
    return [
        [(("]]", "]"), _depth(True, "")), (("]", "]]"), _depth(False, ""))],
        [(("]", "\n"), _depth(True, "]")), (("\n", "]"), _depth(False, "]"))],
    ]


def _paren(opener: str) -> Form:
    close = {"(": ")", "[": "]"}
    other = "[" if opener == "(" else "("

    def gen(rng: random.Random) -> tuple[str, str]:
        ind, name, f, g = rng.choice(_INDENTS), rng.choice(_NAMES), *rng.sample(_FUNCS, 2)
        a = rng.choice(_NAMES)
        if rng.random() < 0.5:
            return tuple(f"{ind}{name} = {f}{o}{a}" for o in (opener, other))
        inner = {"(": f"{g}[{a}]", "[": f"{g}({a})"}
        return tuple(f"{ind}{name} = {f}{o}{inner[o]}" for o in (opener, other))

    return (close[opener], close[other]), gen


def _loop(keyword: str) -> Form:
    other = "while" if keyword == "for" else "for"

    def gen(rng: random.Random) -> tuple[str, str]:
        ind, name = rng.choice(_INDENTS), rng.choice(_NAMES)
        return tuple(f"{ind}{kw} {name}" for kw in (keyword, other))

    return ((" in", ":") if keyword == "for" else (":", " in")), gen


# name -> (description, forms in order of preference; each form is a list of orientations)
BUILTIN: dict[str, tuple[str, list[list[Form]]]] = {
    "quote": (
        "close a string with its matching quote: ' vs \"",
        [[_quote("'", '"'), _quote('"', "'")]],
    ),
    "bracket": (
        "close a list by nesting depth: ]] vs ] (or ] vs newline where ]] is not one token)",
        _bracket_forms(),
    ),
    "paren": ("close the innermost open bracket: ) vs ]", [[_paren("("), _paren("[")]]),
    "loop": ("after 'for x' comes ' in', after 'while x' a ':'", [[_loop("for"), _loop("while")]]),
}


def _bad_answers(tokenizer: Any, orientations: list[Form]) -> list[str]:
    answers = sorted({text for (pair, _) in orientations for text in pair})
    return [a for a in answers if _single_token(tokenizer, a) is None]


def builtin_task(name: str, tokenizer: Any, n: int = N_BUILTIN_ITEMS, seed: int = 0) -> Task:
    """Generate built-in task ``name`` for ``tokenizer``: ``n`` distinct items, the same every
    time for the same arguments, both orientations (which answer is correct) equally often."""
    if name not in BUILTIN:
        raise NnobsError(f"unknown built-in task {name!r}: choose one of {', '.join(BUILTIN)}")
    _, forms = BUILTIN[name]
    usable = [i for i, form in enumerate(forms) if not _bad_answers(tokenizer, form)]
    if not usable:
        bad = _bad_answers(tokenizer, forms[0])[0]
        raise NnobsError(
            f"built-in task {name!r} cannot be used with this tokenizer: the answer {bad!r} "
            f"tokenises to {_pieces(tokenizer, bad)}, and answers must be single tokens"
        )
    form_index = usable[0]
    orientations = forms[form_index]
    rng = random.Random(f"{name}:{seed}")
    seen: set[PromptPair] = set()
    pairs: list[PromptPair] = []
    for _ in range(50 * n):  # bounded: a small template space cannot loop forever
        if len(pairs) == n:
            break
        (correct, incorrect), gen = orientations[len(pairs) % len(orientations)]
        pair = PromptPair(*gen(rng), correct, incorrect)
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    source = {"kind": "builtin", "form": form_index, "seed": seed, "n_generated": len(pairs)}
    return Task(name, pairs, source)


def load_task(
    spec: str | Path,
    tokenizer: Any,
    *,
    equal_length: bool = True,
    align: str | None = None,
    n: int = N_BUILTIN_ITEMS,
    seed: int = 0,
) -> EncodedTask:
    """A built-in task by name or a JSON-lines file, encoded and checked for ``tokenizer``.

    Items of a built-in task that do not fit the tokenizer are dropped (``n_candidates``
    minus ``len`` of the result); in a file every item must fit, else an error names it.
    """
    if tokenizer is None:
        raise NnobsError("the model has no tokenizer: tasks need one to encode their prompts")
    if str(spec) in BUILTIN:
        task = builtin_task(str(spec), tokenizer, n=n, seed=seed)
        return encode_task(task, tokenizer, equal_length=equal_length, align=align, strict=False)
    task = read_task_file(spec)
    return encode_task(task, tokenizer, equal_length=equal_length, align=align, strict=True)
