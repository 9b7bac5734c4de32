"""Every subcommand under bad input: one line ``error: …``, exit status 2, no traceback and no
file written (the ``expect_refusal`` harness in conftest.py).

Each row of ``CASES`` is a command line and a piece of the error it must print. A command line
is a template whose ``{names}`` are the paths of a ``Setting`` (split on spaces), or a function
of the setting that first writes the files the case needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest


@dataclass
class Setting:
    """The paths a case's command line is made of."""

    run: Path  # a trained nnobs run
    tmp: Path  # this case's own directory, watched for new files
    file: Path  # an existing file
    hf_no_tokenizer: Path  # a Hugging Face model saved without its tokenizer
    hf_pickle_only: Path  # a Hugging Face model whose weights are only pytorch_model.bin


Argv = str | Callable[[Setting], list]


def _hf_models(root: Path) -> tuple[Path, Path]:
    """A tiny GPT-2 saved without a tokenizer, and the same weights as a pickle only."""
    import torch
    import transformers
    from safetensors.torch import load_file

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    no_tokenizer, pickle_only = root / "hf-no-tokenizer", root / "hf-pickle-only"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(no_tokenizer)
    pickle_only.mkdir()
    (pickle_only / "config.json").write_bytes((no_tokenizer / "config.json").read_bytes())
    torch.save(load_file(no_tokenizer / "model.safetensors"), pickle_only / "pytorch_model.bin")
    return no_tokenizer, pickle_only


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> tuple[Path, Path]:
    return _hf_models(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def setting(python_run, hf_models, tmp_path) -> Setting:
    file = tmp_path / "a-file"
    file.write_text("not a directory\n")
    return Setting(python_run, tmp_path, file, *hf_models)


def command_line(argv: Argv, setting: Setting) -> list:
    if callable(argv):
        return argv(setting)
    return argv.format(**asdict(setting)).split()


# ------------------------------------------------------------------------------ result files


def _doc(schema: object, version: object = 1) -> dict:
    """The head of a result document: enough for the checks that come before the schema's."""
    return {"schema": schema, "schema_version": version}


def _result_file(root: Path, name: str, content: object) -> Path:
    """``root/name`` holding ``content`` (JSON, or the text itself when a string)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _report(name: str, content: object) -> Argv:
    """nnobs report on a directory holding the result file ``name``."""
    return lambda s: ["report", _result_file(s.tmp / "results", name, content).parent]


def _direction_from(content: object) -> Argv:
    """nnobs ablate --direction-from a file holding ``content``."""
    return lambda s: [
        *f"ablate --model {s.run} --out {s.tmp / 'out'} --direction-from".split(),
        _result_file(s.tmp / "from", "observe.json", content),
    ]


# ------------------------------------------------------------------------------------ cases

COMMANDS = ("train", "observe", "patch", "ablate", "attribute", "study", "report")
# What each intervention command needs besides --model and --out.
INTERVENTIONS = {
    "patch": "--task quote",
    "ablate": "--site blocks.0.mlp_out",
    "attribute": "--task quote",
}
# Every command that loads a model, with {model} left to fill.
MODEL_COMMANDS = {
    "observe": "observe --model {model} --out {{tmp}}/out",
    **{c: f"{c} --model {{model}} {a} --out {{{{tmp}}}}/out" for c, a in INTERVENTIONS.items()},
}
OUT_IS_A_FILE = {
    "train": "train --preset tiny --out {file}",
    "observe": "observe --model {run} --out {file}",
    "observe-all": "observe --model {run} --all-checkpoints --out {file}",
    **{c: f"{c} --model {{run}} {args} --out {{file}}" for c, args in INTERVENTIONS.items()},
    "study": "study --preset quick --out {file}",
    "report": "report {run} --out {file}",
}

CASES: dict[str, tuple[Argv, str]] = {
    **{
        f"out-is-a-file-{c}": (argv, "is a file: give a directory")
        for c, argv in OUT_IS_A_FILE.items()
    },
    "out-under-a-file": (
        "observe --model {run} --out {file}/deeper",
        "a-file', a file: give a directory",
    ),
    "out-empty": (
        lambda s: ["patch", "--model", s.run, "--task", "quote", "--out", ""],
        "--out is empty",
    ),
    **{
        f"no-tokenizer-{c}": (argv.format(model="{hf_no_tokenizer}"), "no tokenizer in")
        for c, argv in MODEL_COMMANDS.items()
    },
    **{
        f"pickle-only-{c}": (argv.format(model="{hf_pickle_only}"), "nnobs loads safetensors only")
        for c, argv in MODEL_COMMANDS.items()
    },
    **{
        f"no-such-model-{c}": (argv.format(model="{tmp}/nope"), "nope")
        for c, argv in MODEL_COMMANDS.items()
    },
    "no-such-model-observe-all": ("observe --model {tmp}/nope --all-checkpoints", "nope"),
    # result documents that name no schema of ours, another kind, or a newer version
    "report-schema-path": (_report("observe.json", _doc("../..")), "unknown schema '../..'"),
    "report-schema-abs-path": (
        _report("observe.json", _doc("/etc/passwd")),
        "unknown schema '/etc/passwd'",
    ),
    "report-schema-unknown": (
        _report("study.json", _doc("nnobs.other")),
        "unknown schema 'nnobs.other'",
    ),
    "report-schema-number": (_report("observe.json", _doc(7)), "unknown schema 7"),
    "report-schema-list": (
        _report("trajectory.json", _doc(["nnobs.study"])),
        "unknown schema ['nnobs",
    ),
    "report-schema-missing": (_report("observe.json", {"layer": 0}), "with a 'schema' field"),
    "report-not-an-object": (_report("observe.json", [1, 2]), "with a 'schema' field"),
    "report-not-json": (_report("observe.json", "{half"), "cannot read result"),
    "report-newer": (
        _report("observe.json", _doc("nnobs.observe", 3)),
        "written by a newer nnobs (nnobs.observe schema 3; this nnobs reads 2): upgrade nnobs",
    ),
    "report-other-kind-study": (
        _report("study.json", _doc("nnobs.observe")),
        "holds an nnobs.observe result, not the nnobs.study result expected here",
    ),
    "report-other-kind-trajectory": (
        _report("trajectory.json", _doc("nnobs.interventions")),
        "holds an nnobs.interventions result, not the nnobs.trajectory result",
    ),
    "report-invalid": (
        _report("observe.json", _doc("nnobs.observe")),
        "does not match schema nnobs.observe",
    ),
    "report-no-results": ("report {tmp}", "holds no study.json, trajectory.json"),
    "report-not-a-directory": ("report {file}", "is not a directory"),
    "direction-schema-path": (_direction_from(_doc("../..")), "unknown schema '../..'"),
    "direction-other-kind": (
        _direction_from(_doc("nnobs.study")),
        "holds an nnobs.study result, not the nnobs.observe",
    ),
    "direction-newer": (_direction_from(_doc("nnobs.observe", 9)), "written by a newer nnobs"),
    # usage errors: argparse's own, in one line too
    **{
        f"usage-{c}": (f"{c} --frobnicate", "(see nnobs")  # a missing or unknown argument
        for c in COMMANDS
    },
    "usage-unknown-option": ("report {run} --frobnicate", "unrecognized arguments: --frobnicate"),
    "usage-missing-model": ("patch --task quote --out {tmp}/o", "required: --model"),
    "usage-not-an-integer": ("study --jobs two", "argument --jobs: invalid int value: 'two'"),
    "usage-unknown-choice": ("ablate --model {run} --mode nope --out {tmp}/o", "invalid choice"),
    # other bad input, already refused in one line
    "train-unknown-preset": ("train --preset huge --out {tmp}/r", "unknown preset 'huge'"),
    "study-unknown-preset": ("study --preset huge --out {tmp}/r", "unknown study preset 'huge'"),
    "train-keep-nothing": (
        "train --preset sparse --set train.weight_keep=0 --out {tmp}/r",
        "train.weight_keep must be a number in (0, 1]",
    ),
    "train-anneal-backwards": (
        "train --preset sparse --set train.keep_anneal=[0.5,0.1] --out {tmp}/r",
        "train.keep_anneal must be two fractions",
    ),
    "patch-no-items": (
        "patch --model {run} --task quote --n-items 0 --out {tmp}/o",
        "--n-items must be a positive",
    ),
    "attribute-no-items": (
        "attribute --model {run} --task quote --items 0 --out {tmp}/o",
        "--items must be a positive",
    ),
    "patch-unknown-task": (
        "patch --model {run} --task {tmp}/none.jsonl --out {tmp}/o",
        "none.jsonl' not found",
    ),
    "ablate-no-site": ("ablate --model {run} --out {tmp}/o", "give --site"),
    "ablate-unknown-site": (
        "ablate --model {run} --site blocks.9.mlp_out --out {tmp}/o",
        "layer 9 is out of range",
    ),
    "observe-unknown-corpus": (
        "observe --model {run} --corpus {tmp}/none --out {tmp}/o",
        "none' not found",
    ),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(CASES))
def test_refused(expect_refusal, setting, case):
    argv, message = CASES[case]
    expect_refusal(command_line(argv, setting), message, watch=[setting.tmp, setting.run])


def test_a_read_only_out_is_refused_before_any_work(expect_refusal, setting, monkeypatch):
    """As root every directory is writable, so the permission check is faked for one."""
    readonly = setting.tmp / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != readonly and real_access(p, mode))
    for argv in (
        "train --preset tiny --out {tmp}/readonly/run",
        "observe --model {run} --out {tmp}/readonly",
        "report {run} --out {tmp}/readonly",
    ):
        expect_refusal(command_line(argv, setting), "is read-only for you", watch=[setting.tmp])
