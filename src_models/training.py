"""Training and fine-tuning: one engine, one event stream, exact resume, DDP under torchrun.

This module owns everything that changes weights:

- data: :func:`load_samples` turns paired files (or arrays, for the plugin) into
  :class:`TrainSample` (preprocessed image ``(C, H, W)`` float32, mask ``(H, W)`` uint8, loss
  weight ``(H, W)`` float32 where 0 = ignore). :class:`PatchDataset` draws patch ``i`` of epoch
  ``e`` from its own seeded generator ``(seed, e, i)``: foreground-centred with probability
  ``foreground_fraction``, then augmented (flips, rot90, small rotation and scale,
  brightness/contrast/gamma, colour jitter for RGB). Because a patch depends only on its index,
  a DistributedSampler shards a global batch exactly and a resumed run draws the same patches.
- loss: BCE + soft Dice (binary) or CE + soft Dice (multi-class), both weighted per pixel.
- :class:`Trainer`: AdamW with linear warm-up then cosine decay (over steps, or over the time
  budget when ``minutes`` is set), validation with the paper's metrics every epoch on held-out
  images, best-checkpoint selection (validation F1, else training loss), early stopping, atomic
  writes, exact resume (model, optimizer, schedule position, step, best score, history), and
  cooperative cancellation at any step that keeps the best checkpoint. :meth:`Trainer.run` is a
  generator of :class:`TrainEvent`; the CLI, the napari widget and the tests all consume it.
- fine-tuning (:func:`finetune_config` + ``Trainer(base=...)``): start from any checkpoint,
  optionally emphasise the pixels a user corrected, freeze BatchNorm statistics or the encoder;
  the result is a new checkpoint whose provenance names its parent's SHA-256. The base file is
  only ever read.
- distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the same code runs with DDP (nccl on
  CUDA, gloo on CPU); rank 0 alone validates, logs and writes files.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .checkpoint import Checkpoint, save_checkpoint
from .errors import CancelledError, R2UNetError
from .fileio import atomic_write
from .metrics import MetricAccumulator
from .nets import ModelConfig, build_model, logits_to_probabilities
from .preprocessing import PreprocessConfig, check_image, measure_stats, normalize_tile, to_chw
from .tiling import sliding_window_inference

ShouldStop = Callable[[], bool]
OUTSIDE_FOV_WEIGHT = 0.1


# -- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """How to train. Every field has a default that works for DRIVE-like data on a CPU."""

    patch_size: int = 96
    batch_size: int = 8  # global batch: split across processes under torchrun
    epochs: int = 40
    minutes: float | None = None  # wall-clock budget; whichever of epochs/minutes ends first
    steps_per_epoch: int | None = None  # default: about one pass over the training pixels
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    foreground_fraction: float = 0.5
    augment: bool = True
    val_fraction: float = 0.1
    val_ids: tuple[str, ...] = ()
    patience: int = 0  # epochs without improvement before stopping; 0 = never stop early
    seed: int = 0
    freeze: str = "none"  # none | bn (BatchNorm statistics) | encoder (and BN statistics)
    correction_weight: float = 5.0  # loss weight of user-corrected pixels when a correction map is given
    val_tile: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "val_ids", tuple(str(v) for v in self.val_ids))
        checks = [
            (self.patch_size >= 16, f"patch_size={self.patch_size} must be >= 16"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.epochs >= 1, f"epochs={self.epochs} must be >= 1"),
            (self.minutes is None or self.minutes > 0, f"minutes={self.minutes} must be > 0"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, f"steps_per_epoch={self.steps_per_epoch} must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr} must be a positive number"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (0 <= self.foreground_fraction <= 1, f"foreground_fraction={self.foreground_fraction} must be in [0, 1]"),
            (0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)"),
            (self.patience >= 0, f"patience={self.patience} must be >= 0"),
            (self.seed >= 0, f"seed={self.seed} must be >= 0"),
            (self.freeze in ("none", "bn", "encoder"), f"freeze={self.freeze!r} must be none, bn or encoder"),
            (self.correction_weight >= 1, f"correction_weight={self.correction_weight} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise R2UNetError(message)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["val_ids"] = list(self.val_ids)
        return d


def finetune_config(**overrides: Any) -> TrainConfig:
    """Defaults for a handful of corrected images: low LR, frozen BN statistics, short budget."""
    defaults = dict(lr=3e-4, epochs=10, warmup_steps=10, freeze="bn", val_fraction=0.0, batch_size=4, steps_per_epoch=25)
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**defaults)


# -- data ----------------------------------------------------------------------------------------
@dataclass
class TrainSample:
    """One training image: ``image`` (C, H, W) float32 normalised, ``mask`` (H, W) uint8 class
    labels, ``weight`` (H, W) float32 loss weight (0 = ignore), ``fov`` (H, W) bool for metrics."""

    id: str
    image: np.ndarray
    mask: np.ndarray
    weight: np.ndarray
    fov: np.ndarray | None = None
    source: str = ""


def make_sample(
    sample_id: str,
    image: np.ndarray,
    mask: np.ndarray,
    preprocess: PreprocessConfig,
    *,
    fov: np.ndarray | None = None,
    channel_axis: int | None | str = "auto",
    source: str = "",
) -> TrainSample:
    """Validate and preprocess one (image, mask) pair; NaN/Inf pixels get loss weight 0."""
    chw = to_chw(np.asarray(image), channel_axis)
    check_image(chw)
    mask = np.asarray(mask)
    if mask.shape != chw.shape[1:]:
        raise R2UNetError(f"sample {sample_id}: mask shape {mask.shape} differs from the image's {chw.shape[1:]}; masks must match their images")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if mask.dtype.kind not in "biu" or mask.min() < 0 or mask.max() > 255:
        raise R2UNetError(f"sample {sample_id}: mask must hold non-negative integer labels, got dtype {mask.dtype}")
    finite = np.isfinite(np.asarray(chw, dtype=np.float32)).all(axis=0)
    stats = measure_stats(chw, preprocess)
    x = normalize_tile(chw, stats, preprocess)
    weight = finite.astype(np.float32)
    if fov is not None:
        fov = np.asarray(fov).astype(bool)
        if fov.shape != mask.shape:
            raise R2UNetError(f"sample {sample_id}: field-of-view mask shape {fov.shape} differs from the image's {mask.shape}")
        weight *= np.where(fov, 1.0, OUTSIDE_FOV_WEIGHT).astype(np.float32)
    return TrainSample(sample_id, x, mask.astype(np.uint8), weight, fov, source)


def emphasize_corrections(sample: TrainSample, corrected: np.ndarray, correction_weight: float) -> TrainSample:
    """A copy of ``sample`` whose loss weight is multiplied by ``correction_weight`` where ``corrected``."""
    corrected = np.asarray(corrected).astype(bool)
    if corrected.shape != sample.mask.shape:
        raise R2UNetError(f"sample {sample.id}: correction map shape {corrected.shape} differs from the image's {sample.mask.shape}")
    weight = sample.weight * np.where(corrected, correction_weight, 1.0).astype(np.float32)
    return dataclasses.replace(sample, weight=weight)


def load_samples(
    images: str | Path, masks: str | Path, fov: str | Path | None, preprocess: PreprocessConfig, classes: int = 1
) -> list[TrainSample]:
    """Paired files (see :func:`src_models.data.pair_files`) -> training samples.

    Binary models (``classes == 1``) take 0/1 or 0/255 masks; multi-class ones integer label
    images with values ``0 .. classes - 1``.
    """
    from .data import binarize_mask, pair_files, read_image, read_mask

    samples = []
    for pair in pair_files(images, masks, fov):
        mask = binarize_mask(read_image(pair.mask), name=f"mask {pair.mask}") if classes == 1 else _read_labels(pair.mask, classes)
        samples.append(
            make_sample(pair.id, read_image(pair.image), mask, preprocess,
                        fov=read_mask(pair.fov) if pair.fov else None, source=str(pair.image))
        )
    return samples


def _read_labels(path: Path, classes: int) -> np.ndarray:
    from .data import read_image

    labels = read_image(path)
    if labels.ndim != 2 or labels.dtype.kind not in "biu":
        raise R2UNetError(f"label image {path} must be 2D integers (shape {labels.shape}, dtype {labels.dtype})")
    if int(labels.max()) >= classes or int(labels.min()) < 0:
        raise R2UNetError(f"label image {path} holds labels up to {int(labels.max())}; a {classes}-class model takes 0..{classes - 1}")
    return labels.astype(np.uint8)


def check_samples(samples: Sequence[TrainSample], config: ModelConfig) -> None:
    if not samples:
        raise R2UNetError("no training images were given")
    channels = {s.image.shape[0] for s in samples}
    if channels != {config.in_channels}:
        raise R2UNetError(f"the model takes {config.in_channels} input channel(s) but the images give {sorted(channels)}; check --channels")
    top = max(int(s.mask.max()) for s in samples)
    if config.out_channels == 1 and top > 1:
        raise R2UNetError(f"masks hold labels up to {top} but the model is binary; give 0/1 masks (or train with --classes)")
    if config.out_channels > 1 and top >= config.out_channels:
        raise R2UNetError(f"masks hold label {top} but the model has {config.out_channels} classes")
    if all(int(s.mask.max()) == 0 for s in samples):
        raise R2UNetError("every mask is empty (no foreground pixel): there is nothing to learn; check the masks")


class PatchDataset(torch.utils.data.Dataset):
    """``length`` random patches per epoch; patch ``i`` of epoch ``e`` depends only on (seed, e, i).

    Items: ``image (C, P, P)`` float32, ``mask (P, P)`` int64, ``weight (P, P)`` float32.
    """

    def __init__(self, samples: Sequence[TrainSample], config: TrainConfig, length: int) -> None:
        self.samples = list(samples)
        self.config = config
        self.length = length
        self.epoch = 0
        half = config.patch_size // 2 + 1
        self._padded = []
        self._foreground = []
        for s in self.samples:  # pad so that any centre inside the image gives a full patch
            pad = ((half, half), (half, half))
            image = np.pad(s.image, ((0, 0), *pad), mode="reflect" if min(s.image.shape[1:]) > half else "edge")
            self._padded.append((image, np.pad(s.mask, pad), np.pad(s.weight, pad)))
            self._foreground.append(np.flatnonzero(s.mask.ravel() > 0))
        sizes = np.array([s.mask.size for s in self.samples], dtype=np.float64)
        self._sample_p = sizes / sizes.sum()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.config.seed, self.epoch, index])
        k = int(rng.choice(len(self.samples), p=self._sample_p))
        sample, (image, mask, weight) = self.samples[k], self._padded[k]
        h, w = sample.mask.shape
        fg = self._foreground[k]
        if fg.size and rng.random() < self.config.foreground_fraction:
            cy, cx = divmod(int(fg[rng.integers(fg.size)]), w)
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        p = self.config.patch_size
        y0, x0 = cy + p // 2 + 1 - p // 2, cx + p // 2 + 1 - p // 2
        x = image[:, y0 : y0 + p, x0 : x0 + p]
        y = mask[y0 : y0 + p, x0 : x0 + p]
        m = weight[y0 : y0 + p, x0 : x0 + p]
        if self.config.augment:
            x, y, m = _augment(rng, x, y, m)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y).astype(np.int64)), torch.from_numpy(np.ascontiguousarray(m))


def _augment(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flips, rot90, small rotation/scale, brightness/contrast/gamma, colour jitter (C > 1)."""
    k = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)
    x, y, m = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k), np.rot90(m, k)
    if flip:
        x, y, m = x[:, :, ::-1], y[:, ::-1], m[:, ::-1]
    if rng.random() < 0.5:  # small rotation and scale: grid_sample, nearest for labels and weights
        angle, scale = math.radians(rng.uniform(-15, 15)), rng.uniform(0.9, 1.1)
        theta = torch.tensor([[math.cos(angle) / scale, -math.sin(angle) / scale, 0.0],
                              [math.sin(angle) / scale, math.cos(angle) / scale, 0.0]], dtype=torch.float32)[None]
        size = (1, 1, *y.shape)
        grid = F.affine_grid(theta, size, align_corners=False)
        xt = torch.from_numpy(np.ascontiguousarray(x))[None]
        x = F.grid_sample(xt, grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0].numpy()
        ym = torch.from_numpy(np.stack([np.ascontiguousarray(y).astype(np.float32), np.ascontiguousarray(m)]))[None]
        ym = F.grid_sample(ym, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0].numpy()
        y, m = ym[0].astype(np.uint8), ym[1]
    x = np.array(x, dtype=np.float32)
    contrast, brightness = rng.uniform(0.85, 1.15), rng.uniform(-0.1, 0.1)
    x = x * contrast + brightness
    if rng.random() < 0.5:
        gamma = float(np.exp(rng.uniform(-0.25, 0.25)))
        positive = x > 0
        x[positive] = x[positive] ** gamma
    if x.shape[0] > 1:
        x *= rng.uniform(0.95, 1.05, size=(x.shape[0], 1, 1)).astype(np.float32)
    return x.astype(np.float32), y, m


# -- loss ----------------------------------------------------------------------------------------
def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Weighted BCE + soft Dice (K = 1) or CE + soft Dice (K >= 2) over the (global) batch.

    ``logits (N, K, H, W)``, ``target (N, H, W)`` int64 labels, ``weight (N, H, W)`` >= 0.
    Under DDP, ``all_reduce`` (autograd-aware sum over processes) makes the Dice sums and the
    weight total global, and the CE term is scaled by ``world_size`` to undo DDP's gradient
    averaging, so N processes with batch B compute the gradient of one process with batch N*B.
    """
    if logits.shape[1] == 1:
        t = target.float()
        ce_sum = (F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none") * weight).sum()
        probs = torch.sigmoid(logits[:, 0])[:, None]
        onehot = t[:, None]
    else:
        ce_sum = (F.cross_entropy(logits, target, reduction="none") * weight).sum()
        probs = torch.softmax(logits, dim=1)[:, 1:]  # Dice on the foreground classes
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    w = weight[:, None]
    total_weight = weight.sum()
    intersection = (probs * onehot * w).sum(dim=(0, 2, 3))
    denominator = ((probs + onehot) * w).sum(dim=(0, 2, 3))
    if all_reduce is not None:
        total_weight = all_reduce(total_weight.detach())
        intersection, denominator = all_reduce(intersection), all_reduce(denominator)
    dice = 1 - (2 * intersection + 1.0) / (denominator + 1.0)
    return world_size * ce_sum / total_weight.clamp_min(1e-6) + dice.mean()


# -- events --------------------------------------------------------------------------------------
@dataclass
class TrainEvent:
    """One item of the event stream. ``kind``: start, baseline (the base model's validation metrics,
    fine-tuning only), step, epoch, checkpoint, done, cancelled, early_stop."""

    kind: str
    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float | None = None
    lr: float | None = None
    metrics: dict[str, float] | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    path: str | None = None
    message: str = ""
    fraction: float = 0.0  # of the budget (steps or minutes, whichever is further along)


# -- distributed ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: NCCL only reduces CUDA tensors, Gloo CPU ones."""
        import torch.distributed as dist

        if self.enabled and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group that torchrun describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _any_rank(flag: bool, dist_info: Distributed) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop together)."""
    if not dist_info.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# -- the engine ----------------------------------------------------------------------------------
@dataclass
class _State:
    step: int = 0
    epoch: int = 0  # completed epochs
    best_score: float = -math.inf
    best_epoch: int = -1
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_loss_sum: float = 0.0  # the current epoch's losses so far (exact across a mid-epoch resume)
    epoch_loss_count: int = 0
    steps_per_epoch: int = 0
    lr_anchor_step: int = 0  # a resume with a longer budget continues the decay from here ...
    lr_anchor_factor: float = -1.0  # ... starting at this factor (-1: no anchor)
    saved_by_this_run: bool = False
    base_metrics: dict[str, float] = field(default_factory=dict)  # the base model on the validation images
    created: str = ""  # when the run started (ISO date); a resumed run keeps it


def resume_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".resume.pt")


def history_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".history.json")


def split_validation(samples: Sequence[TrainSample], config: TrainConfig) -> tuple[list[TrainSample], list[TrainSample]]:
    """Held-out samples by id (``val_ids``) or the last ``val_fraction`` of them (sorted by id)."""
    if config.val_ids:
        unknown = sorted(set(config.val_ids) - {s.id for s in samples})
        if unknown:
            raise R2UNetError(f"validation ids {unknown} are not among the training samples {[s.id for s in samples][:10]}")
        val = [s for s in samples if s.id in config.val_ids]
    else:
        n_val = int(round(len(samples) * config.val_fraction))
        n_val = min(n_val, len(samples) - 1)
        val = sorted(samples, key=lambda s: s.id)[len(samples) - n_val :] if n_val > 0 else []
    train = [s for s in samples if s not in val]
    return train, val


def holdout_region(sample: TrainSample, fraction: float) -> tuple[TrainSample, TrainSample]:
    """Validate on a strip of one image: the last ``fraction`` of its rows (or columns, if wider).

    Returns ``(train, val)``: ``train`` is the whole image with loss weight 0 on the strip (it
    never learns from it); ``val`` is the strip alone (id ``<id>:holdout``). For a single
    corrected image this still gives an honest validation curve.
    """
    if not 0 < fraction < 1:
        raise R2UNetError(f"hold-out fraction {fraction} must be between 0 and 1")
    h, w = sample.mask.shape
    axis = 0 if h >= w else 1
    size = (h, w)[axis]
    cut = size - max(16, int(round(size * fraction)))
    if cut < 16:
        raise R2UNetError(f"image {sample.id} ({h}x{w}) is too small to hold out a part of it for validation; choose no validation")
    strip = (slice(None), slice(cut, None)) if axis == 1 else (slice(cut, None), slice(None))
    weight = sample.weight.copy()
    weight[strip] = 0
    fov = sample.fov[strip] if sample.fov is not None else None
    val = TrainSample(f"{sample.id}:holdout", np.ascontiguousarray(sample.image[(slice(None), *strip)]),
                      np.ascontiguousarray(sample.mask[strip]), np.ascontiguousarray(sample.weight[strip]), fov, sample.source)
    return dataclasses.replace(sample, weight=weight), val


class Trainer:
    """Train a new model or fine-tune ``base``; iterate :meth:`run` for events.

    Args:
        model_config: network to build (ignored when ``base`` is given: its config is used).
        preprocess: preprocessing (ignored when ``base`` is given).
        samples: training samples (validation ones are split off per ``config``).
        out: path of the best checkpoint (``.safetensors``); the resume state and history go beside it.
        base: a checkpoint to fine-tune from; only read, never written.
        class_names, provenance: stored in the checkpoint.
        device: ``cpu``, ``cuda`` ...; under torchrun each rank uses ``cuda:LOCAL_RANK`` if CUDA.
    """

    def __init__(
        self,
        model_config: ModelConfig | None,
        preprocess: PreprocessConfig | None,
        samples: Sequence[TrainSample],
        config: TrainConfig,
        out: str | Path,
        *,
        base: Checkpoint | None = None,
        class_names: Sequence[str] | None = None,
        provenance: dict[str, Any] | None = None,
        device: str = "cpu",
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        from .devices import select_device

        self.config = config
        self.out = Path(out)
        if self.out.suffix != ".safetensors":
            raise R2UNetError(f"output {self.out} must end in .safetensors")
        if base is not None and base.path is not None and self.out.resolve() == base.path.resolve():
            raise R2UNetError(f"output {self.out} is the base model itself; the base model is never overwritten, choose another path")
        if not resume and not overwrite and (self.out.exists() or resume_path(self.out).exists()):
            raise R2UNetError(f"{self.out} (or its .resume.pt) already exists; pass --resume to continue that run or --overwrite to replace it")
        self.base = base
        self.model_config = base.config if base is not None else model_config
        self.preprocess = base.preprocess if base is not None else (preprocess or PreprocessConfig())
        assert self.model_config is not None
        self.class_names = tuple(class_names or (base.class_names if base else ("foreground",) if self.model_config.out_channels == 1 else tuple(f"class{i}" for i in range(self.model_config.out_channels))))
        check_samples(samples, self.model_config)
        self.train_samples, self.val_samples = split_validation(samples, config)
        if not self.train_samples or all(int(s.mask.max()) == 0 for s in self.train_samples):
            raise R2UNetError("no training image with foreground is left after the validation split; hold out fewer images")
        if self.val_samples and all(int(s.mask.max()) == 0 for s in self.val_samples):
            raise R2UNetError("every validation mask is empty, so F1 cannot pick the best checkpoint; choose other --val-ids")
        self.provenance = dict(provenance or {})
        device_obj = select_device(device)
        self.dist = init_distributed(device_obj)
        if self.dist.enabled and device_obj.type == "cuda":
            device_obj = torch.device("cuda", self.dist.local_rank)
        self.device = device_obj
        if config.batch_size % self.dist.world_size:
            raise R2UNetError(f"batch size {config.batch_size} must be divisible by the {self.dist.world_size} processes")
        torch.manual_seed(config.seed)
        self.model = build_model(self.model_config)
        if base is not None:
            self.model.load_state_dict(base.state_dict)
        # channels_last: oneDNN (CPU) and cuDNN run convolutions and their backward faster in NHWC;
        # measured on 2 CPU cores, a training step of R2U-Net is about 10 % faster (benchmarks/bench.py (d))
        self.memory_format = torch.channels_last if self.device.type in ("cpu", "cuda") else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        if self.dist.enabled and self.device.type == "cuda" and self.model_config.norm == "batch":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self._apply_freeze()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        pixels = sum(s.mask.size for s in self.train_samples)
        self.steps_per_epoch = config.steps_per_epoch or int(np.clip(round(pixels / (config.batch_size * config.patch_size**2)), 10, 500))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.dataset = PatchDataset(self.train_samples, config, self.steps_per_epoch * config.batch_size)
        self.state = _State(steps_per_epoch=self.steps_per_epoch)
        self.resumed = resume
        self._should_stop: ShouldStop | None = None
        self._validation_cancelled = False
        if resume:
            self._load_resume()
        if not self.state.created:
            self.state.created = _dt.datetime.now().isoformat(timespec="seconds")

    # -- setup helpers ------------------------------------------------------------------------
    @property
    def _loss_reduction(self) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, int]:
        if not self.dist.enabled:
            return None, 1
        from torch.distributed.nn.functional import all_reduce

        return all_reduce, self.dist.world_size

    def _global_loss_value(self, loss: torch.Tensor) -> float:
        """The loss of the global batch (each rank's value counts its CE share world_size times)."""
        value = loss.detach().clone()
        if not self.dist.enabled:
            return float(value)
        import torch.distributed as dist

        dist.all_reduce(value)  # sum_r (W * ce_r / total + dice) = W * (ce + dice)
        return float(value) / self.dist.world_size

    def _apply_freeze(self) -> None:
        if self.config.freeze == "encoder":
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)

    def _train_mode(self) -> None:
        self.net.train()
        if self.config.freeze in ("bn", "encoder"):  # few images: keep the base model's BN statistics
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _progress(self, total_steps: int | None = None, minutes: float | None | str = "config") -> float:
        """Fraction of the budget used: steps, or wall time when a minutes budget is set."""
        total_steps = total_steps or self.total_steps
        minutes = self.config.minutes if minutes == "config" else minutes
        progress = self.state.step / total_steps
        if minutes:
            progress = max(progress, self.state.elapsed_s / (60 * minutes))
        return min(1.0, progress)

    def _lr_factor(self, total_steps: int | None = None, minutes: float | None | str = "config") -> float:
        """Linear warm-up, then cosine decay to 0 over the budget (from the anchor after a resume)."""
        if self.state.lr_anchor_factor >= 0 and total_steps is None:
            start, end = self.state.lr_anchor_step, self.total_steps
            steps_part = (self.state.step - start) / max(1, end - start)
            progress = max(steps_part, self._progress()) if self.config.minutes else steps_part
            return self.state.lr_anchor_factor * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        warmup = max(1, min(self.config.warmup_steps, (total_steps or self.total_steps) // 10))
        warm = min(1.0, (self.state.step + 1) / warmup)
        return warm * 0.5 * (1 + math.cos(math.pi * self._progress(total_steps, minutes)))

    # -- resume ----------------------------------------------------------------------------------
    def _resume_payload(self) -> dict[str, Any]:
        return {
            "format": "napari-r2unet.resume/1",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": dataclasses.asdict(self.state) | {"history": json.dumps(self.state.history)},
            "train_config": json.dumps(self.config.to_dict()),
            "model_config": self.model_config.to_json(),
            "torch_rng": torch.get_rng_state(),
        }

    def _save_resume(self) -> None:
        payload = self._resume_payload()
        atomic_write(resume_path(self.out), lambda tmp: torch.save(payload, tmp), suffix=".pt")

    def _load_resume(self) -> None:
        path = resume_path(self.out)
        if not path.is_file():
            raise R2UNetError(f"nothing to resume: {path} does not exist (start without --resume)")
        try:
            payload = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise R2UNetError(f"cannot resume from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        if not isinstance(payload, dict) or payload.get("format") != "napari-r2unet.resume/1":
            raise R2UNetError(f"cannot resume from {path}: not a napari-r2unet resume file")
        if payload["model_config"] != self.model_config.to_json():
            raise R2UNetError(f"cannot resume from {path}: it trains a different model ({payload['model_config']})")
        saved = json.loads(payload["train_config"])
        differs = sorted(k for k, v in self.config.to_dict().items() if saved.get(k) != v and k not in ("epochs", "minutes", "patience"))
        if differs:
            raise R2UNetError(f"cannot resume from {path}: training settings differ ({', '.join(differs)}); only --epochs/--minutes/--patience may change")
        state = dict(payload["state"])
        state["history"] = json.loads(state["history"])
        known = {f.name for f in dataclasses.fields(_State)}
        previous = _State(**{k: v for k, v in state.items() if k in known})
        if previous.steps_per_epoch and previous.steps_per_epoch != self.steps_per_epoch:
            raise R2UNetError(f"cannot resume from {path}: it used {previous.steps_per_epoch} steps per epoch, this data gives {self.steps_per_epoch}; use the same images")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        previous_total = saved.get("epochs", self.config.epochs) * self.steps_per_epoch
        self.state = previous
        self.state.saved_by_this_run = False
        if previous_total != self.total_steps or saved.get("minutes") != self.config.minutes:
            # a new budget: keep the current learning rate and decay from there (no warm restart)
            self.state.lr_anchor_factor = self._lr_factor(total_steps=previous_total, minutes=saved.get("minutes"))
            self.state.lr_anchor_step = self.state.step
        torch.set_rng_state(payload["torch_rng"])

    # -- validation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def validate(self) -> dict[str, float] | None:
        if not self.val_samples:
            return None
        self.model.eval()
        acc = MetricAccumulator()

        def predictor(batch: np.ndarray) -> np.ndarray:
            return logits_to_probabilities(self.model(torch.from_numpy(batch).to(self.device)).float()).cpu().numpy()

        for s in self.val_samples:
            probs = sliding_window_inference(s.image, self.config.val_tile, 1, predictor, 0.25,
                                             size_multiple=self.model_config.size_multiple, should_stop=self._should_stop)
            fg = probs[0] if probs.shape[0] == 1 else 1 - probs[0]  # multi-class: any foreground
            target = s.mask > 0
            valid = s.weight > 0 if s.fov is None else s.fov & (s.weight > 0)
            acc.add(fg, target, valid)
        return acc.pooled()

    def _validate_unless_cancelled(self) -> dict[str, float] | None:
        """Validation that a cancel request interrupts (the run then ends as cancelled)."""
        try:
            return self.validate()
        except CancelledError:
            self._validation_cancelled = True
            return None

    def budget(self) -> str:
        """The budget in words, for the provenance and the GUI."""
        text = f"{self.config.epochs} epochs x {self.steps_per_epoch} steps of {self.config.batch_size} x {self.config.patch_size}px"
        return text + (f", at most {self.config.minutes:g} min" if self.config.minutes else "")

    # -- checkpoints -----------------------------------------------------------------------------
    def _provenance(self, metrics: dict[str, float] | None) -> dict[str, Any]:
        prov = {
            "training_data": {
                "train_ids": [s.id for s in self.train_samples],
                "val_ids": [s.id for s in self.val_samples],
                "sources": sorted({str(Path(s.source).parent) for s in self.train_samples if s.source}),
                "pixels": int(sum(s.mask.size for s in self.train_samples)),
            },
            "epochs": self.state.epoch,
            "steps": self.state.step,
            "best_epoch": self.state.best_epoch,
            "train_config": self.config.to_dict(),
            "wall_time_s": round(self.state.elapsed_s, 1),
            "created": self.state.created,
            "budget": self.budget(),
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {self.device}, {self.dist.world_size} process(es)",
            "command": " ".join(sys.argv),
            "package_version": __version__,
        }
        if metrics:
            prov["metrics"] = {k: round(v, 5) for k, v in metrics.items()}
            prov["metrics_on"] = "validation images " + ", ".join(s.id for s in self.val_samples)
        if self.base is not None:
            prov["parent_sha256"] = self.base.sha256
            prov["parent"] = self.base.name
            if self.base.provenance.get("metrics"):
                prov["parent_metrics"] = self.base.provenance["metrics"]
        if self.state.base_metrics:
            prov["metrics_before"] = {k: round(v, 5) for k, v in self.state.base_metrics.items()}
        prov.update(self.provenance)
        return prov

    def _save_best(self, metrics: dict[str, float] | None) -> None:
        self.state.saved_by_this_run = True
        save_checkpoint(self.out, self.model, self.model_config, self.preprocess, self.class_names, self._provenance(metrics))

    def _write_history(self) -> None:
        text = json.dumps(self.state.history, indent=1)
        atomic_write(history_path(self.out), lambda tmp: Path(tmp).write_text(text), suffix=".json")

    # -- the loop --------------------------------------------------------------------------------
    def _event(self, kind: str, **kwargs: Any) -> TrainEvent:
        done = self.state.step
        remaining = self.total_steps - done
        eta = None
        if done and self._run_steps:
            per_step = (time.perf_counter() - self._run_start) / self._run_steps
            eta = remaining * per_step
            if self.config.minutes:
                eta = min(eta, max(0.0, 60 * self.config.minutes - self.state.elapsed_s))
        return TrainEvent(kind, done, self.total_steps, self.state.epoch, self.config.epochs,
                          elapsed_s=self.state.elapsed_s, eta_s=eta, fraction=self._progress(), **kwargs)

    def run(self, should_stop: ShouldStop | None = None) -> Iterator[TrainEvent]:
        """Train until the epoch or time budget ends, early stopping triggers or ``should_stop()``.

        Yields events on rank 0 only. The best checkpoint at ``out`` is valid whenever it exists.
        """
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        main = self.dist.is_main
        self._should_stop = should_stop if main else None
        self._run_start, self._run_steps = time.perf_counter(), 0
        elapsed_before = self.state.elapsed_s
        if main:
            yield self._event("start", message=f"{len(self.train_samples)} training / {len(self.val_samples)} validation images, {self.steps_per_epoch} steps per epoch on {self.device}")
            if self.base is not None and self.val_samples and not self.state.base_metrics and self.state.step == 0:
                metrics = self._validate_unless_cancelled()
                if metrics:
                    self.state.base_metrics = metrics
                    yield self._event("baseline", metrics=metrics, message="the base model on the validation images")
        stop_reason = "cancelled" if _any_rank(self._validation_cancelled, self.dist) else "done"
        local_batch = self.config.batch_size // self.dist.world_size
        while self.state.epoch < self.config.epochs and stop_reason == "done":
            self.dataset.epoch = self.state.epoch
            sampler = DistributedSampler(self.dataset, self.dist.world_size, self.dist.rank, shuffle=False) if self.dist.enabled else None
            loader = DataLoader(self.dataset, batch_size=local_batch, sampler=sampler, shuffle=False, num_workers=0)
            skip = self.state.step - self.state.epoch * self.steps_per_epoch  # resumed mid-epoch
            self._train_mode()
            for i, (x, y, w) in enumerate(loader):
                if i < skip:
                    continue
                cancelled = should_stop is not None and main and should_stop()
                over_time = self.config.minutes is not None and self.state.elapsed_s >= 60 * self.config.minutes
                if _any_rank(cancelled or over_time, self.dist):
                    stop_reason = "cancelled" if cancelled else "time"
                    break
                for group in self.optimizer.param_groups:
                    group["lr"] = self.config.lr * self._lr_factor()
                x, y, w = x.to(self.device, memory_format=self.memory_format), y.to(self.device), w.to(self.device)
                loss = segmentation_loss(self.net(x), y, w, *self._loss_reduction)
                if not torch.isfinite(loss):
                    raise R2UNetError(f"the training loss became {loss.item()} at step {self.state.step}; lower the learning rate (--lr)")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.state.step += 1
                self._run_steps += 1
                self.state.elapsed_s = elapsed_before + time.perf_counter() - self._run_start
                value = self._global_loss_value(loss)
                self.state.epoch_loss_sum += value
                self.state.epoch_loss_count += 1
                if main:
                    yield self._event("step", loss=value, lr=self.optimizer.param_groups[0]["lr"])
            if stop_reason == "time" and self.state.epoch_loss_count:
                yield from self._end_epoch(main, partial=True)  # the last partial epoch counts too
            if stop_reason != "done":
                break
            self.state.epoch += 1
            yield from self._end_epoch(main)
            self.state.elapsed_s = elapsed_before + time.perf_counter() - self._run_start
            if _any_rank(self._validation_cancelled, self.dist):
                stop_reason = "cancelled"
                break
            if self.config.patience and self.state.bad_epochs >= self.config.patience:
                stop_reason = "early_stop"
                break
        if main:
            if not self.state.saved_by_this_run and not (self.resumed and self.out.exists()):
                self._save_best(None)  # stopped before any epoch ended: keep what this run has
            self._save_resume()
            message = {"done": "finished", "time": "time budget reached", "cancelled": "cancelled; the best checkpoint is kept",
                       "early_stop": f"stopped early: no improvement for {self.config.patience} epochs"}[stop_reason]
            yield self._event("cancelled" if stop_reason == "cancelled" else "early_stop" if stop_reason == "early_stop" else "done",
                              metrics=self.state.best_metrics or None, path=str(self.out), message=message)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _end_epoch(self, main: bool, partial: bool = False) -> Iterator[TrainEvent]:
        count = self.state.epoch_loss_count
        train_loss = self.state.epoch_loss_sum / count if count else float("nan")
        self.state.epoch_loss_sum, self.state.epoch_loss_count = 0.0, 0
        metrics = self._validate_unless_cancelled() if main else None
        score = metrics["F1"] if metrics and math.isfinite(metrics["F1"]) else -train_loss
        interrupted = _any_rank(self._validation_cancelled, self.dist)  # not judged: neither best nor a bad epoch
        improved = score > self.state.best_score and not interrupted
        if main:
            epoch = round(self.state.epoch + count / self.steps_per_epoch, 3) if partial else self.state.epoch
            record = {"epoch": epoch, "step": self.state.step, "train_loss": train_loss,
                      "lr": self.optimizer.param_groups[0]["lr"], "elapsed_s": round(self.state.elapsed_s, 2)}
            if metrics:
                record.update({f"val_{k}": v for k, v in metrics.items()})
            self.state.history.append(record)
        if improved:
            self.state.best_score, self.state.best_epoch, self.state.bad_epochs = score, self.state.epoch, 0
            self.state.best_metrics = metrics or {}
            if main:
                self._save_best(metrics)
        elif not interrupted:
            self.state.bad_epochs += 1
        if self.dist.enabled:  # every rank agrees on the early-stopping counter
            import torch.distributed as dist

            t = torch.tensor([self.state.bad_epochs], dtype=torch.int64, device=self.dist.device)
            dist.broadcast(t, 0)
            self.state.bad_epochs = int(t.item())
        if main:
            self._write_history()
            self._save_resume()
            yield self._event("epoch", loss=train_loss, metrics=metrics, lr=self.optimizer.param_groups[0]["lr"])
            if improved:
                yield self._event("checkpoint", metrics=metrics, path=str(self.out), message=f"best so far (epoch {self.state.epoch})")
