"""Writer and reader of our label files, a reader that turns a dropped checkpoint into a model choice, and
:func:`refuse`, how every reader of ours declines a file it cannot read (DICOM and NIfTI: ``_medical_reader.py``).

- :func:`write_labels` saves a Labels layer as our label file (:mod:`src_models.label_files`): a
  0/1 layer as a 0/255 mask other viewers show, with the provenance of the result it came from
  (model, spec, image, threshold; never the stored probabilities).
- :func:`get_label_reader` opens our label files again as a Labels layer (0/1 back), their header in
  ``layer.metadata["r2unet_file"]``. napari's builtin reader also claims ``.tif``, so napari asks
  which reader to use; any other TIFF given to ours is read by napari's builtin reader, so that
  "remember" on ours never breaks the other TIFFs.
- The checkpoint reader claims every ``.safetensors`` file: napari-r2unet checkpoints are offered
  in the Segment widget, any other one is refused with one line naming the file and why.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

PROVENANCE_KEYS = ("model", "spec", "image", "threshold", "postprocessed")  # kept from a result layer's metadata


def label_provenance(meta: dict) -> dict[str, Any]:
    """What a saved layer's file records: its name and, for one of our results (or a layer read from
    our label file), the model, spec, image and threshold (never the probabilities or prediction)."""
    metadata = meta.get("metadata") or {}
    source = metadata.get("r2unet") or metadata.get("r2unet_file") or {}
    provenance: dict[str, Any] = {key: source[key] for key in PROVENANCE_KEYS if key in source}
    if meta.get("name"):
        provenance["layer"] = str(meta["name"])
    return provenance


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Save a Labels layer as our label file (zlib TIFF, atomic): a layer holding only 0 and 1 as a
    0/255 mask, any other as its class values; the provenance in the TIFF's description."""
    import numpy as np

    from src_models.errors import R2UNetError
    from src_models.label_files import write_label_file

    array = np.asarray(data)
    if array.dtype.kind not in "biu":
        raise R2UNetError(f"labels must be integers, got {array.dtype}; save an Image layer with napari's own writer")
    binary = not array.size or (int(array.min()) >= 0 and int(array.max()) <= 1)
    write_label_file(path, array, binary=binary, provenance=label_provenance(meta))
    return [path]


def get_label_reader(path: str | list[str]) -> Any:
    """Our label files (a TIFF with our header, tags read only) open as a Labels layer; any other TIFF
    goes to napari's builtin reader; lists, folders and other suffixes are declined."""
    from src_models.label_files import LABEL_SUFFIXES, label_file_header

    if isinstance(path, list) or not str(path).lower().endswith(LABEL_SUFFIXES):
        return None
    if label_file_header(path) is not None:
        return read_labels
    return builtin_reader(path)


def reader_plugin(path: str) -> str:
    """The plugin that should open ``path`` (napari's builtins claim DICOM, NIfTI and TIFF too): ours
    for DICOM/NIfTI (spacing, affine) and our label files (Labels, provenance), else napari's."""
    from src_models.label_files import label_file_header
    from src_models.medical_io import medical_kind

    return "napari-r2unet" if medical_kind(path, sniff=False) or label_file_header(path) is not None else "napari"


def builtin_reader(path: str) -> Any:
    """napari's own reader of ``path`` (None without napari_builtins)."""
    try:
        from napari_builtins.io import napari_get_reader
    except ImportError:
        return None
    return napari_get_reader(path)


def read_labels(path: str) -> list[tuple]:
    """``[(labels, layer kwargs, "labels")]`` of our label file, named after the file, its header in the metadata."""
    from src_models.errors import R2UNetError
    from src_models.label_files import read_label_file

    from ._layers import label_colors

    try:
        found = read_label_file(path)
    except R2UNetError as exc:
        return refuse(str(exc).replace(str(path), Path(path).name), path)
    if found is None:  # changed since napari asked
        return refuse(f"{Path(path).name} is no napari-r2unet label file any more; open it with napari's builtin reader", path)
    labels, header = found
    return [(labels, {"name": Path(path).stem, "metadata": {"r2unet_file": header}, "colormap": label_colors()}, "labels")]


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
