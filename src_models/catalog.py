"""Torch-free knowledge of checkpoints: their metadata and the pretrained models shipped here.

This module owns reading a ``.safetensors`` header (8-byte length + JSON) without importing
torch, so that the napari plugin can list models at start-up for free; loading weights is
:mod:`src_models.checkpoint`'s job.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .errors import R2UNetError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file; an :class:`R2UNetError` if unreadable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise R2UNetError(f"cannot read checkpoint {path}: too short for a .safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise R2UNetError(f"cannot read checkpoint {path}: header length {length} does not fit the file")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise R2UNetError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise R2UNetError(f"cannot read checkpoint {path}: the header is not valid JSON") from exc
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{name, path, config, provenance}`` of a checkpoint file, from its metadata only."""
    meta = read_metadata(path)
    try:
        config = json.loads(meta.get("config", "{}"))
        provenance = json.loads(meta.get("provenance", "{}"))
    except ValueError as exc:
        raise R2UNetError(f"checkpoint {path} has invalid metadata ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(provenance, dict):
        raise R2UNetError(f"checkpoint {path} has invalid metadata (config and provenance must be JSON objects)")
    path = Path(path)
    return {"name": str(provenance.get("name") or path.stem), "path": path, "config": config, "provenance": provenance}


def pretrained_catalog(weights_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Shipped pretrained models by name (the file stem), described by their own metadata."""
    weights_dir = weights_dir or WEIGHTS_DIR
    if not weights_dir.is_dir():
        return {}
    return {p.stem: {**describe(p), "name": p.stem} for p in sorted(weights_dir.glob("*.safetensors"))}
