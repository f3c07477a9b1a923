"""napari-r2unet compute core: pure PyTorch, no Qt and no napari.

Sub-modules (import what you need; this package imports nothing heavy itself). Which module
owns what, and where a new model, setting or widget goes: the README's "Architecture map".

- models: :mod:`~src_models.nets` (networks, config, factory), :mod:`~src_models.checkpoint`
  (the one file format), :mod:`~src_models.checkpoint_files` (headers, shipped files, torch-free),
  :mod:`~src_models.model_names` (a name -> a model), :mod:`~src_models.user_versions` (the user's
  fine-tuned versions)
- inference: :mod:`~src_models.settings` (defaults and bounds), :mod:`~src_models.preprocessing`,
  :mod:`~src_models.tiling`, :mod:`~src_models.devices`, :mod:`~src_models.inference` (Segmenter),
  :mod:`~src_models.labels`, :mod:`~src_models.predict` (files end to end), :mod:`~src_models.export`
- training: :mod:`src_models.training` (a package), :mod:`~src_models.finetune`,
  :mod:`~src_models.metrics`
- files and the rest: :mod:`~src_models.data`, :mod:`~src_models.fileio`, :mod:`~src_models.resources`,
  :mod:`~src_models.synthetic`, :mod:`~src_models.cli` and :mod:`~src_models.cli_train`
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-r2unet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
