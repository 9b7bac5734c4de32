"""nnobs: observability of transformers.

The Python API in a few names (imported lazily, so ``nnobs --help`` stays fast)::

    import nnobs
    model = nnobs.load_model("runs/default")          # nnobs run/checkpoint or a HF causal LM
    doc = nnobs.observe("runs/default", "stdlib")      # the protocol; a plain-JSON result dict
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "ModelConfig": "nnobs.config",
    "Transformer": "nnobs.model",
    "TrainConfig": "nnobs.train",
    "train": "nnobs.train",
    "load_model": "nnobs.adapter",
    "load_corpus": "nnobs.data",
    "ObserveSettings": "nnobs.protocol",
    "observe": ("nnobs.protocol", "observe_model"),
    "observe_run": "nnobs.trajectory",
    "run_study": "nnobs.study",
    "patch_sweep": "nnobs.patching",
    "ablate": "nnobs.ablation",
    "attribute": "nnobs.attribution",
    "load_task": "nnobs.tasks",
    "render_report": "nnobs.report",
    "NnobsError": "nnobs.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'nnobs' has no attribute {name!r}")
    module, attr = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    return getattr(import_module(module), attr)
