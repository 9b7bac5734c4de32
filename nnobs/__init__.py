"""nnobs: observability of transformers.

The Python API in a few names (imported lazily, so ``nnobs --help`` stays fast)::

    import nnobs
    model = nnobs.load_model("runs/default")          # nnobs run/checkpoint or a HF causal LM
    result = nnobs.observe("runs/default", "stdlib")      # the protocol; a plain-JSON result dict
"""

from importlib import import_module
from typing import Any

from nnobs.core.version import __version__

_API = {
    "ModelConfig": "nnobs.models.config",
    "Transformer": "nnobs.models.transformer",
    "TrainConfig": "nnobs.training.config",
    "train": "nnobs.training.trainer",
    "load_model": "nnobs.models.load",
    "load_corpus": "nnobs.data.corpus",
    "ObserveSettings": "nnobs.observe.settings",
    "observe": ("nnobs.observe.protocol", "observe_model"),
    "observe_run": "nnobs.observe.trajectory",
    "run_study": "nnobs.observe.study",
    "patch_sweep": "nnobs.interventions.patching",
    "PatchSettings": "nnobs.interventions.patching",
    "AblationSettings": "nnobs.interventions.ablation",
    "ablate": "nnobs.interventions.ablation",
    "attribute": "nnobs.interventions.attribution",
    "AttributionSettings": "nnobs.interventions.attribution",
    "load_task": "nnobs.data.tasks",
    "render_report": "nnobs.report.html",
    "NnobsError": "nnobs.core.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'nnobs' has no attribute {name!r}")
    module, attr = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    return getattr(import_module(module), attr)
