"""Synthetic vessel images with exact ground truth, made by our own code (no data files).

Used by the tests (small, fast, deterministic given a seed) and by the plugin's sample data.
:func:`vessel_image` draws random smooth curves of varying width (thick trunks, thin branches)
as dark lines on a bright, vignetted, noisy disc, like a fundus photograph's green channel.
"""

from __future__ import annotations

import numpy as np


def _curve(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """``(steps, 2)`` points of a smooth random walk, one pixel apart, starting inside the image."""
    h, w = shape
    steps = int(1.5 * max(h, w))
    start = rng.uniform([0.1 * h, 0.1 * w], [0.9 * h, 0.9 * w])
    turns = np.cumsum(rng.normal(0, 0.03, steps)) + rng.uniform(0, 2 * np.pi)
    return start + np.cumsum(np.stack([np.sin(turns), np.cos(turns)], 1), axis=0)


def vessel_image(
    shape: tuple[int, int] = (128, 128),
    n_vessels: int = 6,
    seed: int = 0,
    rgb: bool = False,
    noise: float = 0.04,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic vessel image and its mask.

    Returns:
        image: uint8 ``(H, W)`` (or ``(H, W, 3)`` with ``rgb=True``; vessels darkest in green).
        mask: uint8 ``(H, W)``, 1 on vessels, 0 elsewhere.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    depth = np.zeros(shape, dtype=np.float32)
    for i in range(n_vessels):
        width = rng.uniform(2.0, 4.0) if i % 2 == 0 else rng.uniform(0.8, 2.0)
        points = _curve(rng, shape)
        for j, (y, x) in enumerate(points):
            radius = width * (1.0 - 0.5 * j / len(points))  # vessels taper along their course
            y0, y1 = int(max(0, y - radius - 1)), int(min(h, y + radius + 2))
            x0, x1 = int(max(0, x - radius - 1)), int(min(w, x + radius + 2))
            if y0 >= y1 or x0 >= x1:
                continue
            inside = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= radius**2
            mask[y0:y1, x0:x1] |= inside
            contrast = inside * (0.1 + 0.35 * min(1.0, radius / 2.5))
            depth[y0:y1, x0:x1] = np.maximum(depth[y0:y1, x0:x1], contrast)
    r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    background = 0.75 - 0.25 * r2 + 0.05 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    green = np.clip(background - depth + rng.normal(0, noise, shape), 0, 1)
    if rgb:  # fundus colours: bright red, dimmer green (where vessels show best), little blue
        red = np.clip(0.9 * background + 0.15 - 0.25 * depth + rng.normal(0, noise, shape), 0, 1)
        blue = np.clip(0.2 * background - 0.05 * depth + rng.normal(0, noise, shape), 0, 1)
        green = np.clip(0.6 * green, 0, 1)
        image = np.stack([red, green, blue], axis=-1)
    else:
        image = green
    return (image * 255).round().astype(np.uint8), mask.astype(np.uint8)
