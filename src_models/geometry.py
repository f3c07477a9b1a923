"""The ``resize`` inference geometry: letterbox an image to ``size x size`` and back, torch-free.

A model card with ``geometry.kind == "resize"`` (skin lesions, chest X-rays: whole-image
context matters more than native resolution) sees every image as its training size did:

- :func:`letterbox` scales ``(C, H, W)`` so that its longer side is ``size`` (aspect ratio
  kept; bilinear, anti-aliased when shrinking), and pads the shorter side evenly on both sides;
- :func:`unletterbox` takes the network's ``(K, size, size)`` probabilities, crops the padding
  and resizes the rest back to ``(K, H, W)`` (bilinear), so the mask fits the original image.

Padding: the image is padded with its EDGE values, not zeros. The padding comes after
normalisation, where 0 is the darkest value; a black band beside light skin or lung looks like
a dark lesion or a border the network may segment, while replicated edges continue the
background. Masks (training targets) are resized with nearest neighbour and padded with 0
(background), so the padded band is never foreground. Training and inference use these same
functions, so both see identical geometry. :class:`Box` records where the image sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import R2UNetError


@dataclass(frozen=True)
class Box:
    """Where an ``height x width`` image sits inside its ``size x size`` letterbox."""

    height: int
    width: int
    size: int
    top: int
    left: int
    inner_height: int
    inner_width: int


def letterbox_box(height: int, width: int, size: int) -> Box:
    """The placement of an ``height x width`` image scaled to fit ``size x size`` (centred)."""
    if height < 1 or width < 1 or size < 1:
        raise R2UNetError(f"cannot letterbox a {height}x{width} image to {size}x{size}; sides must be >= 1")
    scale = size / max(height, width)
    inner_h = min(size, max(1, round(height * scale)))
    inner_w = min(size, max(1, round(width * scale)))
    return Box(height, width, size, (size - inner_h) // 2, (size - inner_w) // 2, inner_h, inner_w)


def resize_planes(planes: np.ndarray, shape: tuple[int, int], order: int, anti_aliasing: bool) -> np.ndarray:
    """Each ``(H, W)`` plane of ``(C, H, W)`` resized to ``shape`` (float32; identity if equal)."""
    if planes.shape[1:] == shape:
        return planes.astype(np.float32, copy=True)
    from skimage.transform import resize

    return np.stack([resize(p, shape, order=order, mode="edge", anti_aliasing=anti_aliasing,
                            preserve_range=True).astype(np.float32) for p in planes])


def _check_chw(array: np.ndarray, what: str) -> None:
    if array.ndim != 3 or min(array.shape) < 1:
        raise R2UNetError(f"{what} must be (C, H, W) with every side >= 1, got shape {tuple(array.shape)}")


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Box]:
    """``(C, H, W)`` float image -> ``(C, size, size)`` float32 (bilinear, edge-padded) and its :class:`Box`."""
    _check_chw(image, "the image to letterbox")
    box = letterbox_box(image.shape[1], image.shape[2], size)
    shrink = box.inner_height < box.height or box.inner_width < box.width
    inner = resize_planes(np.asarray(image, dtype=np.float32), (box.inner_height, box.inner_width), 1, shrink)
    return _pad(inner, box, "edge"), box


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` label mask -> ``(size, size)`` of its dtype (nearest neighbour, 0-padded)."""
    if mask.ndim != 2:
        raise R2UNetError(f"the mask to letterbox must be (H, W), got shape {tuple(mask.shape)}")
    box = letterbox_box(mask.shape[0], mask.shape[1], size)
    rows = np.minimum((np.arange(box.inner_height) + 0.5) * mask.shape[0] / box.inner_height, mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(box.inner_width) + 0.5) * mask.shape[1] / box.inner_width, mask.shape[1] - 1).astype(int)
    return _pad(np.asarray(mask)[np.ix_(rows, cols)][None], box, "constant")[0]


def _pad(inner: np.ndarray, box: Box, mode: str) -> np.ndarray:
    bottom = box.size - box.top - box.inner_height
    right = box.size - box.left - box.inner_width
    return np.pad(inner, ((0, 0), (box.top, bottom), (box.left, right)), mode=mode)


def unletterbox(probabilities: np.ndarray, box: Box) -> np.ndarray:
    """``(K, size, size)`` probabilities -> ``(K, H, W)`` float32: padding cropped, resized back (bilinear)."""
    _check_chw(probabilities, "the probabilities to resize back")
    if probabilities.shape[1:] != (box.size, box.size):
        raise R2UNetError(f"probabilities of shape {tuple(probabilities.shape)} do not match a {box.size}x{box.size} letterbox")
    inner = probabilities[:, box.top:box.top + box.inner_height, box.left:box.left + box.inner_width]
    return np.clip(resize_planes(inner, (box.height, box.width), 1, False), 0.0, 1.0)
