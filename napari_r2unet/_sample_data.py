"""Sample data: a real fundus photograph and a synthetic vessel image with its ground truth.

The retina is ``skimage.data.retina()`` (public domain, shipped inside scikit-image, no
download). The synthetic sample is made by :func:`src_models.synthetic.vessel_image` and kept in
``sample_data/`` (a test checks the files still equal the generator's output).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SYNTHETIC = {"shape": (256, 256), "n_vessels": 10, "seed": 7, "rgb": True}


def retina() -> list[tuple]:
    from skimage.data import retina as load

    return [(load(), {"name": "retina", "rgb": True, "metadata": {"source": "skimage.data.retina (public domain)"}}, "image")]


def make_synthetic() -> tuple[np.ndarray, np.ndarray]:
    from src_models.synthetic import vessel_image

    return vessel_image(**SYNTHETIC)


def synthetic_vessels() -> list[tuple]:
    from PIL import Image

    image = np.asarray(Image.open(SAMPLE_DIR / "synthetic_vessels.png"))
    truth = (np.asarray(Image.open(SAMPLE_DIR / "synthetic_vessels_truth.png")) > 0).astype(np.uint8)
    return [
        (image, {"name": "synthetic vessels", "rgb": True}, "image"),
        (truth, {"name": "synthetic vessels truth", "visible": False}, "labels"),
    ]
