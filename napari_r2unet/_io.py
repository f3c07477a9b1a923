"""Writer for Labels layers (TIFF, atomic), a reader that turns a dropped checkpoint into a model choice, and
:func:`refuse`, how every reader of ours declines a file it cannot read (DICOM and NIfTI: ``_medical_reader.py``).

The reader claims every ``.safetensors`` file: napari-r2unet checkpoints are offered in the
Segment widget, any other one is refused with one line naming the file and why.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Save a Labels layer as a TIFF (zlib), written to a temp file then renamed."""
    import numpy as np

    from src_models.data import write_tiff

    array = np.asarray(data)
    if array.dtype.kind not in "biu":
        raise ValueError(f"labels must be integers, got {array.dtype}")
    if array.dtype.itemsize > 4 or array.dtype == np.int64:
        array = array.astype(np.uint32 if array.min() >= 0 else np.int32)
    write_tiff(path, array)
    return [path]


def get_checkpoint_reader(path: str | list[str]) -> Any:
    """Claim ``.safetensors`` files: napari-r2unet checkpoints become a model choice, any other one
    gets our one-line notification (never napari's generic reader error); other files are declined."""
    if isinstance(path, list) or not str(path).endswith(".safetensors"):
        return None
    from src_models.checkpoint_files import FORMAT, read_metadata
    from src_models.errors import R2UNetError

    name = Path(path).name
    try:
        found = read_metadata(path).get("format")
    except R2UNetError as exc:  # the core's one line (not a checkpoint, truncated, unreadable), naming the file only
        return partial(refuse, str(exc).replace(str(path), name))
    if found != FORMAT:
        return partial(refuse, f"{name} is not a napari-r2unet checkpoint: no napari-r2unet metadata (format {found!r}); "
                                "it was not saved by napari-r2unet")
    return _register_checkpoint


def refuse(message: str, path: str) -> list[tuple]:
    """Say why the file is not ours; adds no layer (napari's "nothing to add" sentinel)."""
    from napari.utils.notifications import show_error

    show_error(message)
    return [(None,)]


def _register_checkpoint(path: str) -> list[tuple]:
    """Offer the checkpoint in the Segment widget of the current viewer; adds no layer."""
    import napari

    viewer = napari.current_viewer()
    if viewer is not None:
        _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
        choice = widget.add_model(str(Path(path)))
        from napari.utils.notifications import show_info

        show_info(f"model {choice.label} ({choice.arch}) added to the Segment widget")
    return [(None,)]
