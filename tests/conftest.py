"""Shared fixtures: tiny models (widths 4-16) and synthetic images made here, never downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src_models.checkpoint import save_checkpoint
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig, preprocess
from src_models.synthetic import vessel_image

DRIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "DRIVE"


def random_checkpoint(path: Path, seed: int = 0, **config_kwargs) -> Path:
    """A randomly initialised tiny R2U-Net saved as a checkpoint."""
    torch.manual_seed(seed)
    config = ModelConfig(**{"arch": "r2unet", "widths": (4, 8, 16), **config_kwargs})
    save_checkpoint(path, build_model(config), config, PreprocessConfig(), ["vessel"] * max(1, config.out_channels) if config.out_channels == 1 else [f"c{i}" for i in range(config.out_channels)])
    return path


def with_trained_statistics(module, seed: int = 0):
    """``module`` in eval mode with batch-norm statistics and recurrent affines far from the
    identity, as training leaves them (a fresh network's are 0/1, which hides folding mistakes)."""
    import torch

    from src_models.nets import RecurrentConv

    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_var is not None:
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.3, 3)
            if isinstance(m, RecurrentConv) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return module.eval()


def run_to_end(widget, qtbot, timeout_ms: int = 120_000) -> None:
    """Press a dock widget's run button (``start``) and wait until its worker is done."""
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout_ms)


def docked_finetune(viewer, base: str, labels: str):
    """The Fine-tune widget docked in ``viewer``: base model ``base`` (a checkpoint file, else a
    name from its menu), training on the Labels layer ``labels`` alone, without validation."""
    _, fine = viewer.window.add_plugin_dock_widget("napari-r2unet", "Fine-tune")
    if base.endswith(".safetensors"):
        fine.add_model(base)
    else:
        fine.base_combo.choose(base)
    fine.refresh_pairs()
    fine.set_checked([labels])
    fine.validation_combo.setCurrentIndex(fine.validation_combo.findData("none"))
    return fine


def image_folder(folder: Path, count: int = 4, size: int = 64) -> tuple[Path, Path]:
    """``count`` synthetic vessel images (PNG) and their true masks (0/255 PNG) in two folders."""
    images, masks = folder / "images", folder / "truth"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(count):
        img, mask = vessel_image((size, size), seed=10 + i)
        Image.fromarray(img).save(images / f"im{i}.png")
        Image.fromarray(mask * 255).save(masks / f"im{i}.png")
    return images, masks


@pytest.fixture(autouse=True)
def user_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fine-tuned versions go to a temporary folder, never to the real per-user one."""
    folder = tmp_path / "user-models"
    monkeypatch.setenv("R2UNET_MODELS_DIR", str(folder))
    return folder


@pytest.fixture(autouse=True, scope="session")
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported ONNX graphs are cached for the session in a temporary folder, not in ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("onnx-cache")
    os.environ["R2UNET_CACHE_DIR"] = str(folder)
    # the tests run float32 on every machine (a CPU with AMX would pick bf16 for a card that allows
    # it); the tests of bf16 ask for it by name, which this does not override
    os.environ["R2UNET_PRECISION"] = "fp32"
    os.environ["R2UNET_COMPILE"] = "off"  # no test compiles unless it asks (10-30 s a shape); tests of --compile set it
    os.environ["R2UNET_WARMUP"] = "0"  # no background model loads in widget tests, except the test of the warm-up
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return random_checkpoint(tmp_path / "tiny.safetensors")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A depth-4 R2U-Net trained for a few seconds on synthetic vessels: realistic weights."""
    torch.manual_seed(0)
    config = ModelConfig(arch="r2unet", widths=(4, 8, 16, 32))
    model = build_model(config)
    pp = PreprocessConfig()
    data = [vessel_image((64, 64), seed=s) for s in range(16)]
    x = torch.tensor(np.stack([preprocess(img, pp) for img, _ in data]))
    y = torch.tensor(np.stack([m for _, m in data]))[:, None].float()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(60):
        idx = torch.arange(step * 8, step * 8 + 8) % 16
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("trained") / "trained.safetensors"
    save_checkpoint(path, model, config, pp, ["vessel"], {"note": "test fixture"})
    return path


@pytest.fixture
def train_folders(tmp_path) -> tuple[Path, Path]:
    images, masks = tmp_path / "train_img", tmp_path / "train_gt"
    images.mkdir()
    masks.mkdir()
    for seed in range(3):
        img, m = vessel_image((64, 64), seed=seed, rgb=True)
        Image.fromarray(img).save(images / f"{seed}.png")
        Image.fromarray(m * 255).save(masks / f"{seed}.png")
    return images, masks
