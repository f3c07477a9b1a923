"""napari-r2unet: segment medical images with U-Net, RU-Net and R2U-Net inside napari.

Importing this package is cheap: no torch, no Qt. Torch is imported by the workers, when a
model runs; the compute core lives in :mod:`src_models`.
"""

from src_models import __version__

__all__ = ["__version__"]
