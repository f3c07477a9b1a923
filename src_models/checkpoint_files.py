"""Which checkpoint FILES exist and what they say about themselves, read without torch.

This module owns reading and checking a ``.safetensors`` header (8-byte length + JSON) without
importing torch, so that the napari plugin can list and describe models at start-up for free:
:func:`read_header` (the file is whole and is a checkpoint), :func:`read_metadata`,
:func:`describe` (name, config, provenance, model card) and :func:`pretrained_catalog` (the files shipped
in ``src_models/weights/``). Loading weights is :mod:`src_models.checkpoint`'s job; turning a
name a user types into a model is :mod:`src_models.model_names`'s; the user's fine-tuned versions
are :mod:`src_models.user_versions`'.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .errors import R2UNetError
from .model_card import card_from_metadata

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_HEADER_BYTES = 100 * 1024 * 1024
FORMAT = "napari-r2unet.checkpoint"  # the ``format`` entry of our checkpoints' metadata


def _not_a_checkpoint(path: Path) -> R2UNetError:
    return R2UNetError(f"{path} is not a checkpoint (.safetensors) file; choose a model saved by r2unet or the Fine-tune widget")


def _damaged(path: Path, size: int, expected: int | str) -> R2UNetError:
    return R2UNetError(f"checkpoint {path} is truncated or damaged ({size} of {expected} bytes); copy it again")


def _data_end(path: Path, header: Any, size: int) -> int:
    """Where the header says the tensor data ends (the largest ``data_offsets`` end, 0 without tensors)."""
    if not isinstance(header, dict):
        raise _not_a_checkpoint(path)
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _damaged(path, size, "an unknown number of")
        end = max(end, offsets[1])
    return end


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file, checked to describe the whole file, torch-free.

    The file must be ``8-byte length + JSON header + tensor data`` whose size is exactly
    ``8 + header length + the largest data_offsets end``, so a truncated copy is refused here,
    when it is chosen, and not at its first use. An :class:`R2UNetError` names the problem.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(9)
            if len(raw) < 9:
                raise _damaged(path, size, "at least 9")
            (length,) = struct.unpack("<Q", raw[:8])
            if raw[8:9] != b"{" or length < 2:  # the header is a JSON object: anything else is another kind of file
                raise _not_a_checkpoint(path)
            if length > MAX_HEADER_BYTES:
                raise R2UNetError(f"checkpoint {path}: header claims {length} bytes (limit {MAX_HEADER_BYTES}); "
                                  "it is not a checkpoint (.safetensors) file")
            if 8 + length > size:
                raise _damaged(path, size, f"at least {8 + length}")
            header = json.loads(raw[8:] + handle.read(length - 1))
    except OSError as exc:
        raise R2UNetError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise R2UNetError(f"cannot read checkpoint {path}: the header is not valid JSON") from exc
    expected = 8 + length + _data_end(path, header, size)
    if expected != size:
        raise _damaged(path, size, expected)
    return header


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file (checked whole by :func:`read_header`)."""
    header = read_header(path)
    metadata = header.get("__metadata__", {})
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{name, path, config, provenance, card, class_names, preprocess}`` of a checkpoint file, from its metadata only.

    ``card`` is the :class:`~src_models.model_card.ModelCard` saved with it, or the one derived
    from its class names and provenance (older checkpoints).
    """
    meta = read_metadata(path)
    try:
        config = json.loads(meta.get("config", "{}"))
        provenance = json.loads(meta.get("provenance", "{}"))
        class_names = json.loads(meta.get("class_names", '["foreground"]'))
        preprocess = json.loads(meta.get("preprocess", "{}"))
    except (ValueError, RecursionError) as exc:
        raise R2UNetError(f"checkpoint {path} has invalid metadata ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(provenance, dict) or not isinstance(preprocess, dict) \
            or not isinstance(class_names, list):
        raise R2UNetError(f"checkpoint {path} has invalid metadata (config, provenance and preprocess must be JSON objects)")
    try:
        card = card_from_metadata(meta, [str(c) for c in class_names], provenance, preprocess)
    except (ValueError, TypeError, RecursionError) as exc:
        raise R2UNetError(f"checkpoint {path} has an invalid model card ({str(exc)[:200]}); re-save it with a valid card") from exc
    path = Path(path)
    return {"name": str(provenance.get("name") or path.stem), "path": path, "config": config,
            "provenance": provenance, "card": card, "class_names": [str(c) for c in class_names], "preprocess": preprocess}


def pretrained_catalog(weights_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Shipped pretrained models by name (the file stem), described by their own metadata."""
    weights_dir = weights_dir or WEIGHTS_DIR
    if not weights_dir.is_dir():
        return {}
    return {p.stem: {**describe(p), "name": p.stem} for p in sorted(weights_dir.glob("*.safetensors"))}
