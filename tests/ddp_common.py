"""The one training set-up shared by the DDP worker and the single-process reference run."""

from __future__ import annotations

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
