"""Writer for Labels layers (TIFF, atomic) and a reader that turns a dropped checkpoint into a model choice."""

from __future__ import annotations

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
    """Claim ``.safetensors`` files that are napari-r2unet checkpoints; others are left to other readers."""
    if isinstance(path, list) or not str(path).endswith(".safetensors"):
        return None
    from src_models.catalog import read_metadata
    from src_models.errors import R2UNetError

    try:
        if read_metadata(path).get("format") != "napari-r2unet.checkpoint":
            return None
    except R2UNetError:
        return None
    return _register_checkpoint


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
