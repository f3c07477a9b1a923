"""What a set of weights is for and how to run it: the model card, torch-free.

One frozen :class:`ModelCard` per checkpoint (timm's ``PretrainedCfg`` in spirit, MONAI bundle
metadata for the task, data and numbers) is the only place that says: the task and the imaging
modality, the training data and its licence or terms, how input channels and colour are handled,
the inference :class:`Geometry` (``tiled``: native resolution in tiles; ``resize``: the whole
image letterboxed to the training ``size``, probabilities resized back), the training images'
:class:`~src_models.scale.Scale` (their field-of-view diameter, for ``--scale auto``), the default threshold,
the :class:`Postprocess` applied to the mask, and the test metrics. ``data_short`` (optional)
names the data in a few words for menus; without it :attr:`ModelCard.short_data` takes ``data``
up to its first ':', '(', ',' or ';'.

A card is DATA: a new task is a new card, not a new code path. It is stored as JSON under the
``card`` metadata key of a checkpoint (:func:`card_to_json`, :func:`card_from_json`); a checkpoint
without one gets :func:`derived_card` (tiled geometry, its class names, its provenance metrics),
so old checkpoints behave exactly as before.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .configs import config_from_dict
from .scale import Scale
from .settings import DEFAULT_THRESHOLD, THRESHOLD_RANGE

GEOMETRY_KINDS = ("tiled", "resize")
POSTPROCESS_KINDS = ("none", "largest_component", "largest_components")
MIN_RESIZE = 16  # smallest letterbox side a card may ask for


@dataclass(frozen=True)
class Geometry:
    """How an image meets the network: ``tiled`` (native resolution) or ``resize`` to ``size``."""

    kind: str = "tiled"
    size: int | None = None  # the training size (square side) for ``resize``; None for ``tiled``

    def __post_init__(self) -> None:
        if self.kind not in GEOMETRY_KINDS:
            raise ValueError(f"geometry kind={self.kind!r} is unknown; choose one of {list(GEOMETRY_KINDS)}")
        if self.kind == "resize" and (type(self.size) is not int or self.size < MIN_RESIZE):
            raise ValueError(f"geometry 'resize' needs an integer size >= {MIN_RESIZE}, got {self.size!r}")
        if self.kind == "tiled" and self.size is not None:
            raise ValueError("geometry 'tiled' runs at native resolution and takes no size")

    def describe(self) -> str:
        if self.kind == "tiled":
            return "tiled (native resolution)"
        return f"resize to {self.size}x{self.size} (aspect kept, padded; probabilities resized back)"


@dataclass(frozen=True)
class Postprocess:
    """What is done to the thresholded mask: keep the largest component(s), fill holes."""

    kind: str = "none"
    count: int = 1  # components kept by ``largest_components``
    fill_holes: bool = False

    def __post_init__(self) -> None:
        if self.kind not in POSTPROCESS_KINDS:
            raise ValueError(f"postprocess kind={self.kind!r} is unknown; choose one of {list(POSTPROCESS_KINDS)}")
        if type(self.count) is not int or self.count < 1:
            raise ValueError(f"postprocess count={self.count!r} must be an integer >= 1")
        if self.kind == "largest_component" and self.count != 1:
            raise ValueError("postprocess 'largest_component' keeps one component; use 'largest_components' with a count")
        if type(self.fill_holes) is not bool:
            raise ValueError(f"postprocess fill_holes={self.fill_holes!r} must be true or false")

    @property
    def active(self) -> bool:
        return self.kind != "none" or self.fill_holes

    def describe(self) -> str:
        parts = {"none": [], "largest_component": ["largest component"],
                 "largest_components": [f"{self.count} largest components"]}[self.kind]
        if self.fill_holes:
            parts.append("holes filled")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class ModelCard:
    """One set of weights described: task, modality, data, licence, geometry, threshold, metrics."""

    task: str = ""
    modality: str = ""
    data: str = ""
    licence: str = ""
    channels: str = ""  # input channels and colour handling, in words
    geometry: Geometry = field(default_factory=Geometry)
    threshold: float = DEFAULT_THRESHOLD
    postprocess: Postprocess = field(default_factory=Postprocess)
    metrics: Mapping[str, float] = field(default_factory=dict)
    metrics_on: str = ""  # which test set and protocol the metrics come from
    data_short: str = ""  # the data in a few words for menus ("ISIC 2017"); empty: see short_data
    scale: Scale = field(default_factory=Scale)  # the training images' scale, for --scale auto (tiled geometry)
    tta: bool = False  # run with test-time augmentation (the mean of the 4 flips) unless told otherwise
    bf16: bool = False  # validated in bfloat16 (benchmarks/precision_check.py): --precision auto may use it

    def __post_init__(self) -> None:
        for name in ("task", "modality", "data", "licence", "channels", "metrics_on", "data_short"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"card {name} must be text, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.geometry, Geometry) or not isinstance(self.postprocess, Postprocess) or not isinstance(self.scale, Scale):
            raise ValueError("card geometry, postprocess and scale must be Geometry, Postprocess and Scale")
        for name in ("tta", "bf16"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"card {name}={getattr(self, name)!r} must be true or false")
        low, high = THRESHOLD_RANGE
        if (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                or not math.isfinite(self.threshold) or not low <= self.threshold <= high):
            raise ValueError(f"card threshold={self.threshold!r} must be a number in [{low:g}, {high:g}]")
        if not isinstance(self.metrics, Mapping) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in self.metrics.items()):
            raise ValueError("card metrics must map names to numbers")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "metrics", dict(self.metrics))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["metrics"] = dict(self.metrics)
        if not self.bf16:
            del data["bf16"]  # cards without it stay readable by releases that predate the field
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """The card of a JSON object; a ValueError names an unknown key or a bad value."""
        if not isinstance(data, dict):
            raise ValueError(f"a model card must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        if "geometry" in data:
            data["geometry"] = config_from_dict(Geometry, data["geometry"], "card geometry")
        if "postprocess" in data:
            data["postprocess"] = config_from_dict(Postprocess, data["postprocess"], "card postprocess")
        if "scale" in data:
            data["scale"] = config_from_dict(Scale, data["scale"], "card scale")
        return config_from_dict(cls, data, "model card")

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.from_dict(json.loads(text))

    @property
    def short_data(self) -> str:
        """The training data in a few words, for menus: ``data_short``, else ``data`` up to its first
        ':', '(', ',' or ';' ("DRIVE: 20 training fundus photographs ..." -> "DRIVE")."""
        return self.data_short.strip() or re.split(r"[:(,;]", self.data, maxsplit=1)[0].strip()

    def with_(self, **changes: Any) -> ModelCard:
        """A copy with some fields replaced (checked again)."""
        return dataclasses.replace(self, **changes)

    def lines(self) -> list[str]:
        """The card as ``label: value`` lines for ``r2unet info`` and tooltips (empty fields left out)."""
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(self.metrics.items()))
        rows = [("task", self.task), ("modality", self.modality), ("input", self.channels),
                ("geometry", self.geometry.describe()), ("scale", self.scale.describe()), ("threshold", f"{self.threshold:g}"),
                ("postprocess", self.postprocess.describe()),
                ("test-time augmentation", "mean of the 4 flips" if self.tta else ""),
                ("bfloat16", "validated (--precision auto uses it where the CPU has native bf16)" if self.bf16 else ""), ("data", self.data), ("licence", self.licence),
                ("metrics", metrics + (f" ({self.metrics_on})" if metrics and self.metrics_on else ""))]
        return [f"{label}: {value}" for label, value in rows if value]


def _channels_text(preprocess: Mapping[str, Any]) -> str:
    channels, normalize = preprocess.get("channels"), preprocess.get("normalize")
    if not channels:
        return ""
    return f"{channels} channel(s), {normalize or 'percentile'} normalisation"


def derived_card(class_names: list[str] | tuple[str, ...], provenance: Mapping[str, Any],
                 preprocess: Mapping[str, Any] | None = None) -> ModelCard:
    """The card of a checkpoint saved without one: tiled, its class names, its provenance metrics."""
    metrics = provenance.get("metrics")
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
        if isinstance(metrics, dict) else {}
    return ModelCard(task=", ".join(str(c) for c in class_names), data=str(provenance.get("description") or ""),
                     licence=str(provenance.get("license") or provenance.get("licence") or ""),
                     channels=_channels_text(preprocess or {}), metrics=metrics,
                     metrics_on=str(provenance.get("metrics_on") or ""))


def card_from_metadata(metadata: Mapping[str, str], class_names: list[str] | tuple[str, ...],
                       provenance: Mapping[str, Any], preprocess: Mapping[str, Any] | None = None) -> ModelCard:
    """The ``card`` metadata entry of a checkpoint, or :func:`derived_card` where it has none.

    A ValueError (with the reason) when the entry is there but is not a valid card.
    """
    if "card" not in metadata:
        return derived_card(class_names, provenance, preprocess)
    return ModelCard.from_json(metadata["card"])
