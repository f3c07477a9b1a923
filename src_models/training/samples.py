"""Training samples, torch-free: validate and preprocess (image, mask) pairs, weight and split them.

:class:`TrainSample` holds a preprocessed image ``(C, H, W)`` float32, a mask ``(H, W)`` uint8
of class labels, a loss weight ``(H, W)`` float32 (0 = ignore) and an optional field of view.
:func:`make_sample` builds one from arrays (the plugin), :func:`load_samples` from paired files
(the CLI); :func:`emphasize_corrections` weights up the pixels a user corrected;
:func:`check_samples` checks them against a model; :func:`letterbox_sample` fits one to the
``resize`` geometry; :func:`split_validation` and
:func:`holdout_region` and :func:`holdout_blocks` set validation images (or parts of one image) apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import R2UNetError
from ..preprocessing import PreprocessConfig, check_image, measure_stats, normalize_tile, to_chw
from .config import OUTSIDE_FOV_WEIGHT, TrainConfig

if TYPE_CHECKING:
    from ..nets import ModelConfig


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

    @property
    def valid(self) -> np.ndarray:
        """The pixels that count in validation: weight > 0, inside the field of view if any."""
        return self.weight > 0 if self.fov is None else self.fov & (self.weight > 0)


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
    from ..data import pair_files, read_image, read_mask

    samples = []
    for pair in pair_files(images, masks, fov):
        samples.append(
            make_sample(pair.id, read_image(pair.image), read_training_mask(pair.mask, classes), preprocess,
                        fov=read_mask(pair.fov) if pair.fov else None, source=str(pair.image))
        )
    return samples


def read_training_mask(path: Path, classes: int = 1) -> np.ndarray:
    """A mask file -> ``(H, W)`` uint8 labels: 0/1 for a binary model (``classes == 1``, from 0/1
    or 0/255 files, see :func:`src_models.data.binarize_mask`), else ``0 .. classes - 1``."""
    from ..data import binarize_mask, read_image

    if classes == 1:
        return binarize_mask(read_image(path), name=f"mask {path}").astype(np.uint8)
    return _read_labels(path, classes)


def _read_labels(path: Path, classes: int) -> np.ndarray:
    from ..data import read_image

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


def split_validation(samples: Sequence[TrainSample], config: TrainConfig) -> tuple[list[TrainSample], list[TrainSample]]:
    """Held-out samples by id (``val_ids``) or the last ``val_fraction`` of them (sorted by id)."""
    if config.val_ids:
        # file-made ids are lower-cased stems (--val-ids ISIC_0001 means isic_0001); the widget's are layer names
        wanted = {i.strip() for i in config.val_ids if i.strip()} or set(config.val_ids)
        ids = {s.id for s in samples}
        lowered = {i.lower() for i in ids}
        unknown = sorted(i for i in wanted if i not in ids and i.lower() not in lowered)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            known = ", ".join(s.id for s in samples[:3])
            raise R2UNetError(f"validation ids {shown} are not among the training samples (e.g. {known}); check --val-ids")
        wanted_lower = {i.lower() for i in wanted}
        val = [s for s in samples if s.id in wanted or s.id.lower() in wanted_lower]
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



def holdout_blocks(sample: TrainSample, fraction: float, margin: int = 32) -> tuple[TrainSample, list[TrainSample]]:
    """Validate on blocks of one image that represent it, not on one strip of its edge.

    The image is cut into a grid of square-ish blocks (about 64 px or more, at most 6 x 6);
    blocks with under a quarter of their pixels valid (outside the field of view, or of weight 0)
    are passed over. Of the others, ``fraction`` (at least one) are held out, chosen at evenly
    spaced ranks of their foreground density, so that sparse and dense parts are both judged.
    Returns ``(train, vals)``: ``train`` is the whole image with loss weight 0 on those blocks;
    each of ``vals`` (id ``<id>:holdout<k>``) is one block with ``margin`` pixels of context
    around it, its field of view the block alone. An image under 128 px a side falls back to
    :func:`holdout_region`'s strip.
    """
    if not 0 < fraction < 1:
        raise R2UNetError(f"hold-out fraction {fraction} must be between 0 and 1")
    h, w = sample.mask.shape
    grid = min(6, min(h, w) // 64)
    if grid < 2:
        train, val = holdout_region(sample, fraction)
        return train, [val]
    valid = sample.valid
    ys, xs = np.linspace(0, h, grid + 1).astype(int), np.linspace(0, w, grid + 1).astype(int)
    blocks = []
    for i in range(grid):
        for j in range(grid):
            box = (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
            n = int(valid[box].sum())
            if n >= valid[box].size / 4:
                blocks.append((float(((sample.mask[box] > 0) & valid[box]).sum()) / n, i * grid + j, box))
    if not blocks:
        raise R2UNetError(f"image {sample.id} has too few valid pixels to hold out a part of it for validation; choose no validation")
    blocks.sort(key=lambda b: (b[0], b[1]))
    k = max(1, int(round(fraction * len(blocks))))
    chosen = [blocks[int((r + 0.5) * len(blocks) / k)] for r in range(k)]
    weight = sample.weight.copy()
    vals = []
    for number, (_, _, (rows, cols)) in enumerate(sorted(chosen, key=lambda b: b[1])):
        weight[rows, cols] = 0
        outer = (slice(max(0, rows.start - margin), min(h, rows.stop + margin)), slice(max(0, cols.start - margin), min(w, cols.stop + margin)))
        fov = np.zeros((outer[0].stop - outer[0].start, outer[1].stop - outer[1].start), dtype=bool)
        fov[rows.start - outer[0].start : rows.stop - outer[0].start, cols.start - outer[1].start : cols.stop - outer[1].start] = True
        if sample.fov is not None:
            fov &= sample.fov[outer]
        vals.append(TrainSample(f"{sample.id}:holdout{number}", np.ascontiguousarray(sample.image[(slice(None), *outer)]),
                                np.ascontiguousarray(sample.mask[outer]), np.ascontiguousarray(sample.weight[outer]),
                                np.ascontiguousarray(fov), sample.source))
    return dataclasses.replace(sample, weight=weight), vals


def letterbox_sample(sample: TrainSample, size: int) -> TrainSample:
    """``sample`` letterboxed to ``size x size`` as the ``resize`` geometry runs it
    (:mod:`src_models.geometry`): the image bilinear and edge-padded, the mask, weight and field
    of view nearest, and the padded band weighted 0 (it is cropped away at inference)."""
    from ..geometry import letterbox, letterbox_mask

    image, _ = letterbox(sample.image, size)
    fov = letterbox_mask(sample.fov.astype(np.uint8), size).astype(bool) if sample.fov is not None else None
    return dataclasses.replace(sample, image=image, mask=letterbox_mask(sample.mask, size),
                               weight=letterbox_mask(sample.weight, size), fov=fov)


def rescale_sample(sample: TrainSample, factor: float) -> TrainSample:
    """``sample`` resized by ``factor``, as ``--scale`` resizes an image before the network: the
    image bilinear (anti-aliased when shrunk), the mask, weight and field of view nearest."""
    if factor == 1.0:
        return sample
    from ..geometry import resize_planes
    from ..scale import resized_shape

    shape = resized_shape(sample.mask.shape, factor)

    def nearest(plane: np.ndarray) -> np.ndarray:
        return resize_planes(plane[None].astype(np.float32), shape, order=0, anti_aliasing=False)[0]

    fov = nearest(sample.fov) > 0.5 if sample.fov is not None else None
    return dataclasses.replace(sample, image=resize_planes(sample.image, shape, order=1, anti_aliasing=factor < 1),
                               mask=np.rint(nearest(sample.mask)).astype(np.uint8), weight=nearest(sample.weight), fov=fov)

