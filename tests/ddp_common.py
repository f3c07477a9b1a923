"""The one training set-up shared by the DDP worker and the single-process reference run.

Both run in float64 (:func:`float64`): the two runs sum the same numbers in different orders
(two half batches reduced across processes vs one batch), so they agree only up to rounding, and
in float64 that rounding is ~1e-16 relative, far below anything a real mismatch (a lost half
batch, a wrong gradient scale) would give, on any CPU and with any kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from src_models.nets import ModelConfig
from src_models.preprocessing import PreprocessConfig
from src_models.synthetic import vessel_image
from src_models.training import TrainConfig, make_sample

CONFIG = ModelConfig(arch="r2unet", widths=(4, 8), norm="group")  # no batch statistics: ranks see half batches
PP = PreprocessConfig()


def samples():
    return [make_sample(str(i), *vessel_image((48, 48), seed=i), PP) for i in range(3)]


def train_config() -> TrainConfig:
    return TrainConfig(patch_size=32, batch_size=4, epochs=2, steps_per_epoch=3, val_fraction=0.0, warmup_steps=1, lr=1e-2)


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Models built inside are float64 (the Trainer then feeds them float64 batches)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
