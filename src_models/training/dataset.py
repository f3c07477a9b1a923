"""Random training patches: :class:`PatchDataset` and its augmentation.

Patch ``i`` of epoch ``e`` comes from its own generator seeded with ``(seed, e, i)``:
foreground-centred with probability ``foreground_fraction``, then augmented (flips, rot90, small
rotation and scale, aspect-ratio changes in the ``resize`` geometry, brightness/contrast/gamma,
colour jitter for RGB). In the ``resize``
geometry each sample is already letterboxed to ``patch_size`` (see
:func:`~src_models.training.samples.letterbox_sample`) and is taken whole. Because a patch depends
only on its index, a DistributedSampler shards a global batch exactly and a resumed run draws
the same patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .samples import TrainSample


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
        self.whole = config.geometry == "resize"  # samples are letterboxed to patch_size: take them whole
        for s in self.samples:  # pad so that any centre inside the image gives a full patch
            if self.whole:
                if s.mask.shape != (config.patch_size, config.patch_size):
                    raise ValueError(f"sample {s.id} is {s.mask.shape}, not letterboxed to {config.patch_size}")
                self._padded.append((s.image, s.mask, s.weight))
                self._foreground.append(np.zeros(0, dtype=np.int64))
                continue
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
        x, y, m = self._padded[k] if self.whole else self._crop(rng, k)
        if self.config.augment:
            x, y, m = _augment(rng, x, y, m, self.config)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y).astype(np.int64)), torch.from_numpy(np.ascontiguousarray(m))

    def _crop(self, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A ``patch_size`` patch of sample ``k``: centred on foreground with ``foreground_fraction``."""
        image, mask, weight = self._padded[k]
        h, w = self.samples[k].mask.shape
        fg = self._foreground[k]
        if fg.size and rng.random() < self.config.foreground_fraction:
            cy, cx = divmod(int(fg[rng.integers(fg.size)]), w)
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        p = self.config.patch_size
        y0, x0 = cy + p // 2 + 1 - p // 2, cx + p // 2 + 1 - p // 2
        return image[:, y0 : y0 + p, x0 : x0 + p], mask[y0 : y0 + p, x0 : x0 + p], weight[y0 : y0 + p, x0 : x0 + p]


def _augment(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, m: np.ndarray,
             config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flips and rot90 (with ``config.rot90``; else left-right flips only), rotation up to
    ``config.rotate`` degrees, zoom up to ``config.scale`` (or in ``config.zoom``) and (``resize``
    geometry) an aspect-ratio change up to ``config.aspect``, brightness/contrast/gamma, colour
    jitter (C > 1), a colour shift (``config.colour``, 3 channels), then blur up to ``config.blur`` and JPEG down to ``config.jpeg``."""
    k = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)
    if config.rot90:
        x, y, m = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k), np.rot90(m, k)
    if flip:
        x, y, m = x[:, :, ::-1], y[:, ::-1], m[:, ::-1]
    whole = config.geometry == "resize"
    aspect = whole and config.aspect > 0 and rng.random() < 0.5
    if aspect or (rng.random() < 0.5 and (config.rotate or config.scale or config.zoom)):  # grid_sample, nearest for labels and weights
        angle = math.radians(rng.uniform(-config.rotate, config.rotate))
        scale = math.exp(rng.uniform(*np.log(config.zoom))) if config.zoom else rng.uniform(1 - config.scale, 1 + config.scale)
        # aspect: one side shrunk, as a letterboxed image of another aspect ratio (the freed band is padded)
        sy, sx = (1.0, rng.uniform(1 - config.aspect, 1))[:: 1 if rng.random() < 0.5 else -1] if aspect else (1.0, 1.0)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        matrix = np.diag([1 / sx, 1 / sy]) @ rotation / scale  # output -> input coordinates (x, y)
        theta = torch.tensor(np.concatenate([matrix, np.zeros((2, 1))], axis=1), dtype=torch.float32)[None]
        size = (1, 1, *y.shape)
        grid = F.affine_grid(theta, size, align_corners=False)
        xt = torch.from_numpy(np.ascontiguousarray(x))[None]
        # a letterboxed image is edge-padded at inference: "border" pads as it does
        padding = "border" if whole else "reflection"
        x = F.grid_sample(xt, grid, mode="bilinear", padding_mode=padding, align_corners=False)[0].numpy()
        ym = torch.from_numpy(np.stack([np.ascontiguousarray(y).astype(np.float32), np.ascontiguousarray(m)]))[None]
        ym = F.grid_sample(ym, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0].numpy()
        y, m = ym[0].astype(np.uint8), ym[1]
    x = np.array(x, dtype=np.float32)
    contrast, brightness = rng.uniform(0.85, 1.15), rng.uniform(-0.1, 0.1)
    x = x * contrast + brightness
    if rng.random() < 0.5:
        gamma = float(np.exp(rng.uniform(-config.gamma, config.gamma)))
        positive = x > 0
        x[positive] = x[positive] ** gamma
    if x.shape[0] > 1:
        x *= rng.uniform(0.95, 1.05, size=(x.shape[0], 1, 1)).astype(np.float32)
    if config.colour and x.shape[0] == 3 and rng.random() < 0.5:
        x = _colour_shift(rng, x, config.colour)
    if config.blur and rng.random() < 1 / 3:  # a softer lens or focus
        from scipy.ndimage import gaussian_filter

        x = gaussian_filter(x, sigma=(0, *[rng.uniform(0.3, config.blur)] * 2)).astype(np.float32)
    if config.jpeg and rng.random() < 1 / 3:
        x = _jpeg(x, int(rng.integers(config.jpeg, 101)))
    return x.astype(np.float32), y, m


def _colour_shift(rng: np.random.Generator, x: np.ndarray, strength: float) -> np.ndarray:
    """``(3, P, P)`` image with another camera's colour: each channel's gamma changed by up to
    ``exp(strength / 2)``, the hue turned about the gray axis by up to ``strength x 60`` degrees and
    the saturation scaled by ``exp(U(-strength, strength))``."""
    gammas = np.exp(rng.uniform(-strength / 2, strength / 2, size=3))
    x = np.where(x > 0, np.abs(x) ** gammas[:, None, None], x).astype(np.float32)
    angle = rng.uniform(-strength, strength) * math.pi / 3
    saturation = math.exp(rng.uniform(-strength, strength))
    axis = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = math.cos(angle) * np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(axis, axis)
    gray = np.outer(axis, axis)  # projection on the gray axis: what saturation leaves alone
    matrix = gray + saturation * (rotation - gray)
    return np.einsum("ij,jhw->ihw", matrix.astype(np.float32), x).astype(np.float32)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    """``(C, P, P)`` float image through a JPEG round trip at ``quality`` (its [0, 1] part;
    values outside keep their excess). One channel as gray, three as RGB, others one by one."""
    import io

    from PIL import Image

    clipped = np.clip(x, 0.0, 1.0)
    planes = [clipped.transpose(1, 2, 0)] if x.shape[0] == 3 else [p for p in clipped]
    out = []
    for plane in planes:
        buffer = io.BytesIO()
        Image.fromarray(np.rint(plane * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer), dtype=np.float32) / 255)
    decoded = out[0].transpose(2, 0, 1) if x.shape[0] == 3 else np.stack(out)
    return (decoded + (x - clipped)).astype(np.float32)

