"""Preprocessing shared by training and inference, stored in every checkpoint.

This module owns the path from a user's array to the network's float input:

1. layout: a 2D image is ``(H, W)`` (gray) or ``(H, W, C)`` / ``(C, H, W)`` with the channel
   axis given or guessed (a last or first axis of size <= 4 on an image of more than 4 pixels
   per side); :func:`to_chw` returns ``(C, H, W)``;
2. channels (:attr:`PreprocessConfig.channels`): ``gray`` (luminance of RGB; the first channel
   of gray or gray + alpha images),
   ``green`` (the green channel of RGB, the usual choice for fundus images), ``rgb`` (3 colour
   channels, alpha dropped, gray repeated) or ``all`` (every channel as it is);
3. intensity (:attr:`PreprocessConfig.normalize`): ``percentile`` maps the ``low``..``high``
   percentiles of each channel to 0..1 (robust to outliers, works for uint8, uint16 and float
   alike), ``zscore`` subtracts the median and divides by 1.4826 x the median absolute
   deviation, ``range`` divides integer images by their dtype's maximum (floats unchanged).

Statistics are measured once per image (:func:`measure_stats`, on a strided subsample of at most
about 4 million pixels, so it is cheap for large and lazy images) and then applied to any tile
(:func:`normalize_tile`), so tiled and whole-image preprocessing agree exactly. Non-finite
pixels (NaN, Inf) are ignored by the statistics and become 0 after normalisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .components import percentiles
from .configs import config_from_dict, config_to_json
from .errors import R2UNetError

CHANNEL_MODES = ("gray", "green", "rgb", "all")
NORMALIZE_MODES = ("percentile", "zscore", "range")
_LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # skimage.color.rgb2gray weights
_MAX_STAT_PIXELS = 4_000_000


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes network input. Serialisable to JSON; stored in checkpoints."""

    channels: str = "green"
    normalize: str = "percentile"
    low: float = 1.0
    high: float = 99.0

    def __post_init__(self) -> None:
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels={self.channels!r} is unknown; choose one of {list(CHANNEL_MODES)}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize={self.normalize!r} is unknown; choose one of {list(NORMALIZE_MODES)}")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"percentiles low={self.low}, high={self.high} must satisfy 0 <= low < high <= 100")

    def out_channels(self, image_channels: int) -> int:
        """Channels the network sees for an image with ``image_channels`` channels."""
        if self.channels in ("gray", "green"):
            return 1
        if self.channels == "rgb":
            return 3
        return image_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return config_to_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return config_from_dict(cls, data, "preprocessing config")


def guess_channel_axis(shape: tuple[int, ...]) -> int | None:
    """Channel axis of a 2D image of ``shape``: ``None`` for ``(H, W)``, else 0 or -1."""
    if len(shape) == 2:
        return None
    if len(shape) != 3:
        raise R2UNetError(
            f"expected a 2D image (H, W) or (H, W, C), got shape {tuple(shape)}; "
            "stacks and time series go through predict_stack"
        )
    if shape[-1] <= 4 and min(shape[:2]) > 4:
        return -1
    if shape[0] <= 4 and min(shape[1:]) > 4:
        return 0
    if shape[-1] <= 4:
        return -1
    raise R2UNetError(
        f"cannot tell the channel axis of an image of shape {tuple(shape)}; "
        "pass channel_axis (the axis holding 1-4 colour channels)"
    )


def to_chw(image: Any, channel_axis: int | None = "auto") -> Any:  # type: ignore[assignment]
    """``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` -> ``(C, H, W)`` (a view; lazy arrays stay lazy)."""
    shape = tuple(image.shape)
    if channel_axis == "auto":
        channel_axis = guess_channel_axis(shape)
    if channel_axis is None:
        if len(shape) != 2:
            raise R2UNetError(f"channel_axis=None needs a 2D (H, W) image, got shape {shape}")
        return image[None]
    if len(shape) != 3:
        raise R2UNetError(f"expected a 3D (H, W, C) or (C, H, W) image, got shape {shape}")
    axis = channel_axis % 3
    if axis == 0:
        return image
    if axis == 2:
        return image.transpose(2, 0, 1)
    raise R2UNetError(f"channel_axis must be the first or last axis, got {channel_axis} for shape {shape}")


def check_image(chw: Any) -> None:
    """Refuse what no preprocessing can turn into network input, with a message that says why."""
    c, h, w = chw.shape
    if h < 1 or w < 1:
        raise R2UNetError(f"the image is empty (shape {tuple(chw.shape)}); open an image with pixels")
    kind = np.dtype(chw.dtype).kind
    if kind not in "biuf":
        raise R2UNetError(f"image dtype {chw.dtype} is not numeric; convert it to uint8, uint16 or float32")


def select_channels(chw: np.ndarray, mode: str) -> np.ndarray:
    """``(C, H, W)`` any dtype -> ``(C', H, W)`` float32 per ``mode`` (see module docstring)."""
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf: measure_stats says so
        return _select_channels(chw, mode)


def _select_channels(chw: np.ndarray, mode: str) -> np.ndarray:
    c = chw.shape[0]
    x = np.asarray(chw)
    if mode == "all":
        return x.astype(np.float32)  # always a copy: the caller's array is never modified
    if c >= 3:  # RGB(A): alpha (and extra channels) dropped
        colour = x[:3].astype(np.float32)
        if mode == "green":
            return colour[1:2]
        if mode == "gray":
            return np.tensordot(_LUMA, colour, axes=1)[None].astype(np.float32)
        return colour
    intensity = x[:1].astype(np.float32)  # gray, or gray + alpha: alpha dropped
    return np.repeat(intensity, 3, axis=0) if mode == "rgb" else intensity


def _subsample(chw: Any) -> np.ndarray:
    _, h, w = chw.shape
    step = max(1, int(np.ceil(np.sqrt(h * w / _MAX_STAT_PIXELS))))
    return np.asarray(chw[:, ::step, ::step])


def measure_stats(chw: Any, config: PreprocessConfig) -> np.ndarray:
    """Per-channel ``(offset, scale)`` pairs, shape ``(C', 2)``, so that ``(x - offset) / scale``.

    ``chw`` is the raw ``(C, H, W)`` image (numpy or a lazy array such as dask).
    """
    raw_dtype = np.dtype(chw.dtype)
    sample = select_channels(_subsample(chw), config.channels)
    stats = np.zeros((sample.shape[0], 2), dtype=np.float64)
    for i, channel in enumerate(sample):
        values = channel[np.isfinite(channel)]
        if values.size == 0:
            raw = np.asarray(_subsample(chw), dtype=np.float64) if raw_dtype.kind == "f" and raw_dtype.itemsize > 4 else None
            if raw is not None and np.isfinite(raw).any():
                top = float(np.abs(raw[np.isfinite(raw)]).max())
                raise R2UNetError(f"pixel values up to {top:.3g} do not fit in float32 (max 3.4e38); rescale the image (e.g. divide by its maximum)")
            raise R2UNetError("the image has no finite pixel values (all NaN or Inf); check the input data")
        if config.normalize == "range":
            top = float(np.iinfo(raw_dtype).max) if raw_dtype.kind in "iu" else 1.0
            stats[i] = (0.0, top)
        elif config.normalize == "percentile":
            lo, hi = (float(v) for v in percentiles(values, [config.low, config.high]))
            if hi <= lo:  # sparse image (e.g. > 99 % zeros): fall back to the full range
                lo, hi = float(values.min()), float(values.max())
            stats[i] = (lo, hi - lo)
        else:
            median = float(np.median(values))
            mad = 1.4826 * float(np.median(np.abs(values - median)))
            stats[i] = (median, mad if mad > 0 else float(values.std()))
        if not stats[i, 1] > 0:  # constant channel: map it to 0 rather than divide by 0
            stats[i, 1] = 1.0
    return stats


def normalize_tile(chw_tile: Any, stats: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Raw ``(C, h, w)`` tile -> float32 ``(C', h, w)`` network input using image-wide ``stats``."""
    x = select_channels(np.asarray(chw_tile), config.channels)
    x -= stats[:, 0, None, None].astype(np.float32)
    x /= stats[:, 1, None, None].astype(np.float32)
    if config.normalize == "percentile":
        np.clip(x, -1.0, 2.0, out=x)  # keep outliers from dominating; in-range values untouched
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0, copy=False)


def preprocess(image: Any, config: PreprocessConfig, channel_axis: int | None = "auto") -> np.ndarray:  # type: ignore[assignment]
    """Whole image -> float32 ``(C', H, W)``; the training engine and tests use this."""
    chw = to_chw(image, channel_axis)
    check_image(chw)
    return normalize_tile(chw, measure_stats(chw, config), config)


def input_notice(image_channels: int, config: PreprocessConfig, task: str = "") -> str | None:
    """One line saying how an image with ``image_channels`` channels was fitted to a model that
    preprocesses with ``config`` (None when it fits as it is): a gray image given to an RGB
    model is repeated to three channels, a colour photo given to a gray model is converted to
    luminance, an alpha channel is dropped. ``task`` names the model in the line."""
    model = f"the {task} model" if task else "the model"
    mode = config.channels
    if mode == "rgb" and image_channels < 3:
        return f"{model} expects RGB colour images; this gray image was repeated to 3 channels (results may be poorer)"
    if mode == "gray" and image_channels >= 3:
        return f"{model} expects gray images; this colour image was converted to gray (luminance)"
    if mode == "green" and image_channels < 3:
        return f"{model} expects colour images (it reads their green channel); this gray image was used as it is"
    if mode != "all" and image_channels in (2, 4):
        return f"{model} ignores the alpha channel of this image"
    return None
