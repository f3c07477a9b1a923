"""Training and fine-tuning: one engine, one event stream, exact resume, DDP under torchrun.

Importing this package loads no torch: the public names below are re-exported lazily (PEP 562),
so ``from src_models.training import TrainConfig`` stays light and ``Trainer`` loads the engine.

- :mod:`.config`   :class:`TrainConfig` (each field's help and bounds), :data:`FINETUNE_DEFAULTS`,
  :func:`finetune_config` (torch-free)
- :mod:`.engine`   samples, patches, loss, events, DDP and the :class:`Trainer`
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "config",
    "FINETUNE_DEFAULTS": "config",
    "FREEZE_CHOICES": "config",
    "finetune_config": "config",
    **dict.fromkeys(
        ("TrainSample", "make_sample", "emphasize_corrections", "load_samples", "check_samples", "split_validation",
         "holdout_region", "OUTSIDE_FOV_WEIGHT", "PatchDataset", "segmentation_loss", "TrainEvent", "Distributed",
         "init_distributed", "resume_path", "history_path", "Trainer", "ShouldStop"),
        "engine",
    ),
}

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
