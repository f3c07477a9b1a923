"""Our label files: masks any viewer shows, that we open again as labels, with their provenance.

This module owns the on-disk form of every mask napari-r2unet writes for a person to keep (a
correction, a prediction saved from napari, ``r2unet predict``'s masks, a version's training
masks). It is torch-free.

- A binary mask is stored 0/255 (uint8): 0/1 looks black in other viewers. Multi-class labels
  are stored as they are (uint8, uint16 or uint32).
- The TIFF's ImageDescription is tifffile's JSON (``shape``, so a stack of stacks reads back
  whole) with our object under ``"napari-r2unet"``: ``kind``
  ("labels"), ``binary``, ``stored`` ("0/255" or "classes") and the provenance the writer gave
  (image, model, threshold, status, date, ...). A file without it is not ours:
  :func:`read_label_file` returns None and other readers take it.
- Writes are atomic (:func:`~src_models.fileio.atomic_write`): a mask is never half-written.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import R2UNetError
from .fileio import atomic_write

TAG = "napari-r2unet"
KIND = "labels"
LABEL_SUFFIXES = (".tif", ".tiff")


def storable_labels(labels: np.ndarray, binary: bool) -> tuple[np.ndarray, str]:
    """``labels`` as written: 0/255 uint8 for a binary mask, the smallest unsigned type otherwise."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu":
        raise R2UNetError(f"labels must be integers, got {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        raise R2UNetError("labels hold negative values; erase them first")
    if binary:
        return (labels > 0).astype(np.uint8) * np.uint8(255), "0/255"
    top = int(labels.max()) if labels.size else 0
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
    return labels.astype(dtype, copy=False), "classes"


def write_label_file(path: str | os.PathLike[str], labels: np.ndarray, *, binary: bool,
                     provenance: dict[str, Any] | None = None) -> Path:
    """Write ``labels`` (``(H, W)`` or a stack) atomically as our labels TIFF; returns the path."""
    import tifffile

    path = Path(path)
    stored, form = storable_labels(labels, binary)
    header = {"kind": KIND, "binary": bool(binary), "stored": form,
              "written": _dt.datetime.now().isoformat(timespec="seconds"), **(provenance or {})}
    # tifffile's own JSON description, our header inside: it keeps the shape (a stack of stacks too)
    metadata = {TAG: json.loads(json.dumps(header, default=str))}
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, stored, compression="zlib", photometric="minisblack", metadata=metadata), suffix=".tif")
    return path


def label_file_header(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Our header of a TIFF (tags only, the pixels are not read), or None when it is not our label file."""
    if not str(path).lower().endswith(LABEL_SUFFIXES):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            description = tif.pages[0].description if tif.pages else ""
    except Exception:  # unreadable or not a TIFF: not ours to explain (the image readers say why)
        return None
    if not description or TAG not in description:
        return None
    try:
        header = json.loads(description).get(TAG)
    except (ValueError, AttributeError):
        return None
    return header if isinstance(header, dict) and header.get("kind") == KIND else None


def read_label_file(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]] | None:
    """``(labels, provenance)`` of our label file (a binary mask back to 0/1), or None if it is not one."""
    header = label_file_header(path)
    if header is None:
        return None
    import tifffile

    try:
        stored = tifffile.imread(path)
    except Exception as exc:
        raise R2UNetError(f"cannot read the labels {path}: {exc}; the file may be damaged") from exc
    labels = (stored > 0).astype(np.uint8) if header.get("binary") else stored
    return labels, header
