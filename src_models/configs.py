"""Torch-free JSON round trip of the frozen dataclass configs stored in checkpoints.

:class:`~src_models.nets.ModelConfig` and :class:`~src_models.preprocessing.PreprocessConfig`
are written into a checkpoint's metadata as JSON and read back through :func:`config_from_dict`,
which refuses anything that is not an object of known keys (the dataclass then checks values).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

T = TypeVar("T")


def config_to_json(config: Any) -> str:
    """A config's ``to_dict()`` as canonical JSON (sorted keys)."""
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_dict(cls: type[T], data: Any, kind: str) -> T:
    """``cls(**data)`` for a dict of ``cls``'s field names; a ValueError naming ``kind`` otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"a {kind} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {kind} keys {unknown}; known keys are {sorted(known)}")
    return cls(**data)
