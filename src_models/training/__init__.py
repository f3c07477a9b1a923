"""Training and fine-tuning: one engine, one event stream, exact resume, DDP under torchrun.

Importing this package loads no torch: the public names below are re-exported lazily (PEP 562),
so ``from src_models.training import TrainConfig`` stays light and ``Trainer`` loads the engine.

- :mod:`.config`      :class:`TrainConfig` (each field's help and bounds), :data:`FINETUNE_DEFAULTS`,
  :func:`finetune_config`, :func:`resolve_budget` (torch-free)
- :mod:`.samples`     :class:`TrainSample`: files or arrays -> preprocessed, weighted samples; splits (torch-free)
- :mod:`.events`      :class:`EventKind` and :class:`TrainEvent`, the one event stream (torch-free)
- :mod:`.resume`      the run state, ``.resume.pt`` and ``.history.json`` (torch-free at import)
- :mod:`.dataset`     :class:`PatchDataset`: seeded random patches and their augmentation
- :mod:`.loss`        weighted BCE/CE + soft Dice, exact under DDP
- :mod:`.distributed` DDP under torchrun: ranks and the collectives the engine needs
- :mod:`.trainer`     :class:`Trainer`, the engine: schedule, validation, checkpoints, the loop
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "config": ("TrainConfig", "FINETUNE_DEFAULTS", "FREEZE_CHOICES", "OUTSIDE_FOV_WEIGHT", "finetune_config", "resolve_budget"),
    "samples": ("TrainSample", "make_sample", "emphasize_corrections", "load_samples", "check_samples",
                "split_validation", "holdout_region", "holdout_blocks"),
    "events": ("EventKind", "TrainEvent"),
    "resume": ("TrainState", "resume_path", "history_path"),
    "dataset": ("PatchDataset",),
    "loss": ("segmentation_loss",),
    "distributed": ("Distributed", "init_distributed"),
    "trainer": ("Trainer", "ShouldStop"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
