"""napari-r2unet compute core: pure PyTorch, no Qt and no napari.

Sub-modules (import what you need; this package imports nothing heavy itself):

- :mod:`src_models.nets`          U-Net, ResU-Net, RU-Net, R2U-Net and the config/factory
- :mod:`src_models.checkpoint`    safe ``.safetensors`` checkpoints with metadata
- :mod:`src_models.preprocessing` channel handling and intensity normalisation
- :mod:`src_models.inference`     tiled sliding-window inference
- :mod:`src_models.metrics`       SE, SP, ACC, F1/Dice, Jaccard, ROC AUC
- :mod:`src_models.data`          image IO and image/mask pairing
- :mod:`src_models.cli`           the ``r2unet`` command line
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-r2unet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
