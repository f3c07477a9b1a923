"""Scale normalisation, torch-free: how large an image is compared with the model's training images.

A vessel network learns vessel calibres in pixels: a fundus camera that images the retina at 1.7x
DRIVE's resolution shows vessels 1.7x wider, and a model trained on DRIVE misses them. The model
card's :class:`Scale` records the training images' field-of-view (FOV) diameter in pixels;
:func:`estimate_fov_diameter` measures it on any fundus image (the bright disc on a dark border:
its widest row or column, so a disc cut at the top and bottom, as many cameras crop it, still
counts), and :func:`scale_factor` turns ``--scale auto|1|F`` into the factor the image is
resized by before the network (the probabilities are resized back to the original size by the
:class:`~src_models.inference.Segmenter`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import R2UNetError

SCALE_KINDS = ("none", "fov_diameter")
AUTO_TOLERANCE = 0.1  # auto leaves images within 10 % of the training scale at native resolution
FACTOR_RANGE = (0.2, 5.0)  # the factors auto may choose; an explicit --scale F must lie here too
ESTIMATE_SIDE = 512  # the FOV is measured on a copy at most this many pixels high or wide
MIN_BORDER = 0.03  # a FOV that leaves less than this fraction of the image dark is not a disc on a border


@dataclass(frozen=True)
class Scale:
    """The training scale: ``fov_diameter`` = the training images' FOV diameter in pixels (median)."""

    kind: str = "none"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCALE_KINDS:
            raise ValueError(f"scale kind={self.kind!r} is unknown; choose one of {list(SCALE_KINDS)}")
        if self.kind == "none" and self.value is not None:
            raise ValueError("scale 'none' takes no value")
        if self.kind == "fov_diameter":
            if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value) or self.value < 16:
                raise ValueError(f"scale 'fov_diameter' needs a diameter >= 16 pixels, got {self.value!r}")
            object.__setattr__(self, "value", float(self.value))

    def describe(self) -> str:
        if self.kind == "none":
            return ""
        return f"field of view {self.value:.0f} px across (--scale auto resizes other images to it)"


def _fov_mask(chw: Any) -> tuple[np.ndarray, float]:
    """The bright-disc mask of a ``(C, H, W)`` image on a copy at most ESTIMATE_SIDE pixels, and
    the copy's pixel size in original pixels."""
    from .components import otsu_threshold, percentiles

    step = max(1, math.ceil(max(chw.shape[1:]) / ESTIMATE_SIDE))
    small = np.asarray(chw[:, ::step, ::step], dtype=np.float32)
    brightness = np.nan_to_num(small.max(axis=0))
    if float(brightness.max()) <= float(brightness.min()):
        return np.zeros(brightness.shape, dtype=bool), float(step)
    # the border is near black: a threshold between it and the dim periphery of the disc
    low, high = (float(v) for v in percentiles(brightness, [1, 99]))
    level = min(otsu_threshold(brightness), low + 0.1 * (high - low))
    return brightness > level, float(step)


def estimate_fov_diameter(chw: Any) -> float | None:
    """The FOV diameter of a fundus image ``(C, H, W)`` in pixels, or None if it has no dark border.

    The disc is the largest bright component (holes filled: dark lesions and the optic cup stay
    inside); its diameter is its widest row or column, which a disc cropped at two sides keeps.
    """
    from .components import fill_holes, label  # numpy only: scipy costs a fresh process ~0.4 s to import

    mask, step = _fov_mask(chw)
    labels, count = label(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    disc = fill_holes(labels == int(np.argmax(sizes)) + 1)
    if disc.mean() > 1 - MIN_BORDER or disc.mean() < 0.05:
        return None  # no dark border (a crop inside the FOV), or no disc at all
    widest = max(int(disc.sum(axis=1).max()), int(disc.sum(axis=0).max()))
    return widest * step


def parse_scale_option(text: str | float) -> str | float:
    """``auto``, or a factor > 0 from ``--scale`` (``1`` = native resolution)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        factor = float(text)
    except (TypeError, ValueError):
        raise R2UNetError(f"--scale {text!r} must be 'auto' or a factor such as 1 or 0.6") from None
    low, high = FACTOR_RANGE
    if not math.isfinite(factor) or not low <= factor <= high:
        raise R2UNetError(f"--scale {text!r} must be 'auto' or a factor in [{low:g}, {high:g}] (1 = native resolution)")
    return factor


def scale_factor(option: str | float, reference: Scale, chw: Any) -> tuple[float, str]:
    """The factor to resize ``chw`` by before the network, and a line saying why (empty: native)."""
    option = parse_scale_option(option)
    if option != "auto":
        factor = float(option)
        return factor, "" if factor == 1 else f"resized x{factor:.3g} before the network (--scale {factor:g})"
    if reference.kind == "none":
        return 1.0, ""
    diameter = estimate_fov_diameter(chw)
    if diameter is None:
        return 1.0, "no field of view found to compare with the model's training scale: segmented at native resolution (set --scale to resize)"
    factor = float(np.clip(reference.value / diameter, *FACTOR_RANGE))
    if abs(math.log(factor)) <= math.log(1 + AUTO_TOLERANCE):
        return 1.0, ""
    return factor, (f"field of view {diameter:.0f} px across, the model's {reference.value:.0f}: "
                    f"resized x{factor:.2f} to the training scale, probabilities resized back (--scale 1: native)")


def resized_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(H, W)`` scaled by ``factor`` (each side at least 1)."""
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def median_fov_diameter(images: list[Any]) -> float | None:
    """The median FOV diameter over ``(C, H, W)`` images (those without a measurable FOV left out)."""
    values = [d for d in (estimate_fov_diameter(image) for image in images) if d is not None]
    return float(np.median(values)) if values else None


__all__ = ["Scale", "estimate_fov_diameter", "median_fov_diameter", "parse_scale_option", "resized_shape", "scale_factor"]
