"""How to train, torch-free: :class:`TrainConfig`, the fine-tuning defaults and their bounds.

Each :class:`TrainConfig` field is defined once here, with its default and, in its
``dataclasses.field`` metadata, what the CLI help and the napari settings panel show:

- ``"help"``: one line saying what the setting does;
- ``"min"`` / ``"max"``: the bounds that :class:`TrainConfig` enforces (inclusive, unless
  ``"min_exclusive"`` / ``"max_exclusive"`` is true); ``"finite"``: NaN and infinity are refused;
- ``"choices"``: the allowed values of a text setting;
- ``"ui_min"`` / ``"ui_max"``: the range a settings panel offers where the config itself sets no
  bound (a spin box needs one); they are not enforced.

:data:`FINETUNE_DEFAULTS` holds what fine-tuning a few corrected images changes from those
defaults, and :func:`finetune_config` applies it.

The budget: ``epochs`` (``None``: no epoch limit) and ``minutes`` (``None``: no time limit); a
run ends when the first of those that is set ends, and at least one must be. :func:`resolve_budget`
turns what a user gave (the CLI's ``--epochs`` / ``--minutes``, the widget's spin boxes) into
the two fields: one given alone is the only limit, both given: whichever ends first, neither:
the defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import R2UNetError

FREEZE_CHOICES = ("none", "bn", "encoder")
GEOMETRY_CHOICES = ("tiled", "resize")  # as the model card's Geometry kinds
BUDGET_LIMITS = ("epochs", "minutes")  # when a run ends (see :func:`resolve_budget`)
OUTSIDE_FOV_WEIGHT = 0.1  # loss weight of the pixels outside a field-of-view mask


def _meta(help: str, **bounds: Any) -> dict[str, Any]:
    return {"metadata": {"help": help, **bounds}}


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Every field has a default that works for DRIVE-like data on a CPU."""

    patch_size: int = field(default=96, **_meta("side of the square training patches in pixels", min=16, ui_max=512))
    batch_size: int = field(default=8, **_meta("patches per optimizer step (the global batch: split across processes under torchrun)", min=1, ui_max=64))
    epochs: int | None = field(default=40, **_meta("epochs to train (unset: no epoch limit; with minutes too, whichever ends first)", min=0, min_exclusive=True, ui_max=1000))
    minutes: float | None = field(default=None, **_meta("wall-clock budget in minutes (unset: no time limit; with epochs too, whichever ends first)", min=0, min_exclusive=True, ui_max=24 * 60))
    steps_per_epoch: int | None = field(default=None, **_meta("optimizer steps per epoch (unset: about one pass over the training pixels)", min=1, ui_max=10000))
    lr: float = field(default=2e-3, **_meta("peak learning rate of AdamW (linear warm-up, then cosine decay)", min=0, min_exclusive=True, finite=True, ui_min=1e-5, ui_max=1e-1))
    weight_decay: float = field(default=1e-4, **_meta("AdamW weight decay", min=0))
    l2sp: float = field(default=0.0, **_meta("pull toward the starting model's weights (L2-SP): adds l2sp x the sum of squared differences to the loss (0 = off; needs a base model)", min=0, ui_max=1))
    fn_weight: float = field(default=0.5, **_meta("weight of missed foreground against false foreground in the overlap loss (Tversky beta; 0.5 = soft Dice; 0.7 favours recall, for under-segmented lesions)", min=0, max=1, min_exclusive=True, max_exclusive=True, ui_max=0.95))
    warmup_steps: int = field(default=100, **_meta("steps of linear learning-rate warm-up (at most a tenth of the run)"))
    foreground_fraction: float = field(default=0.5, **_meta("probability that a patch is centred on a foreground pixel", min=0, max=1))
    augment: bool = field(default=True, **_meta("augment patches (flips, rotations, scale, intensity, colour)"))
    val_fraction: float = field(default=0.1, **_meta("fraction of the images held out for validation", min=0, max=1, max_exclusive=True))
    val_ids: tuple[str, ...] = field(default=(), **_meta("sample IDs to hold out for validation instead of val_fraction"))
    patience: int = field(default=0, **_meta("epochs without improvement before stopping early (0 = never)", min=0))
    seed: int = field(default=0, **_meta("random seed of the weights and the patches", min=0))
    freeze: str = field(default="none", **_meta("what to keep fixed: none, bn (BatchNorm statistics) or encoder (and BN statistics)", choices=FREEZE_CHOICES))
    keep_base: bool = field(default=False, **_meta("fine-tuning with validation images: the base model is the epoch to beat, so the result is never worse than the base on them (when no epoch beats it, the output holds the base weights)"))
    correction_weight: float = field(default=5.0, **_meta("loss weight of the pixels the user corrected (when a correction map is given)", min=1, ui_max=100))
    geometry: str = field(default="tiled", **_meta("tiled: random patches at native resolution; resize: each whole image letterboxed to patch_size (aspect kept, padding ignored by the loss), as the model card's resize geometry runs it", choices=GEOMETRY_CHOICES))
    rotate: float = field(default=15.0, **_meta("largest random rotation of the augmentation, in degrees", min=0, max=180))
    scale: float = field(default=0.1, **_meta("largest random zoom of the augmentation, as a fraction (0.1: 0.9x to 1.1x)", min=0, max=0.5))
    aspect: float = field(default=0.0, **_meta("largest random change of the aspect ratio, as a fraction (0.4: one side shrunk to 0.6x-1x); resize geometry only, the band it frees padded as inference pads", min=0, max=0.5))
    zoom: tuple[float, float] | None = field(default=None, **_meta("zoom range (smallest, largest) of the augmentation, drawn log-uniformly, e.g. 0.6,1.8 for other cameras' scales; replaces scale when set"))
    gamma: float = field(default=0.25, **_meta("largest |log gamma| of the intensity augmentation, on half the patches (0.5: gamma 0.61 to 1.65)", min=0, max=1.5))
    blur: float = field(default=0.0, **_meta("largest Gaussian blur of the augmentation, sigma in pixels, on a third of the patches (0 = off)", min=0, max=5))
    colour: float = field(default=0.0, **_meta("largest colour change of the augmentation (3-channel images), on half the patches: saturation scaled by up to exp(colour), hue turned by up to colour x 60 degrees, each channel's gamma by up to exp(colour / 2) (0 = off; 0.3 for photographs from other cameras)", min=0, max=1))
    jpeg: int = field(default=0, **_meta("lowest JPEG quality of the augmentation, on a third of the patches (0 = off)", min=0, max=100))
    rot90: bool = field(default=True, **_meta("augment with 90-degree rotations and vertical flips too (off for upright images such as chest X-rays)"))
    precision: str = field(default="fp32", **_meta("training arithmetic: fp32, bf16 (autocast: faster where the CPU has AMX or AVX-512 BF16, or on a GPU that has bf16) or auto (bf16 where native, else fp32); validation runs in fp32", choices=("fp32", "bf16", "auto")))
    val_tile: int = field(default=1024, **_meta("tile side of the sliding-window validation, in pixels"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "val_ids", tuple(str(v) for v in self.val_ids))
        if self.zoom is not None:
            zoom = tuple(self.zoom)
            if len(zoom) != 2 or not all(isinstance(z, (int, float)) and math.isfinite(z) for z in zoom) or not 0.2 <= zoom[0] <= zoom[1] <= 5:
                raise R2UNetError(f"zoom={self.zoom!r} must be two factors 0.2 <= smallest <= largest <= 5, e.g. 0.6,1.8")
            object.__setattr__(self, "zoom", (float(zoom[0]), float(zoom[1])))
        for f in dataclasses.fields(self):
            problem = _violation(getattr(self, f.name), f.metadata)
            if problem:
                raise R2UNetError(f"{f.name}={getattr(self, f.name)!r} must be {problem}")
        if self.epochs is None and self.minutes is None:
            raise R2UNetError("no budget: epochs and minutes are both unset; give an epoch limit, a time budget in minutes, or both")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["val_ids"] = list(self.val_ids)
        d["zoom"] = list(self.zoom) if self.zoom is not None else None
        return d


def _violation(value: Any, meta: Mapping[str, Any]) -> str:
    """The rule ``value`` breaks (empty if none); ``None`` means "not set" and always passes."""
    if value is None:
        return ""
    if "choices" in meta:
        return "" if value in meta["choices"] else ", ".join(meta["choices"][:-1]) + " or " + meta["choices"][-1]
    low, high = meta.get("min"), meta.get("max")
    if low is None and high is None:
        return ""
    below = low is not None and (value <= low if meta.get("min_exclusive") else value < low)
    above = high is not None and (value >= high if meta.get("max_exclusive") else value > high)
    if not (below or above or value != value or (meta.get("finite") and not math.isfinite(value))):
        return ""
    if high is None:
        return f"{'>' if meta.get('min_exclusive') else '>='} {low:g}" + (" and finite" if meta.get("finite") else "")
    opening, closing = "(" if meta.get("min_exclusive") else "[", ")" if meta.get("max_exclusive") else "]"
    return f"in {opening}{low:g}, {high:g}{closing}"


def setting(name: str) -> Mapping[str, Any]:
    """The metadata (help, bounds, choices) of the :class:`TrainConfig` field ``name``."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f.metadata
    raise KeyError(f"TrainConfig has no field {name!r}")


def default(name: str) -> Any:
    """The :class:`TrainConfig` default of ``name``."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f.default
    raise KeyError(f"TrainConfig has no field {name!r}")


# What fine-tuning a handful of corrected images changes: low LR, frozen BN statistics, short budget.
FINETUNE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(lr=3e-4, epochs=10, warmup_steps=10, freeze="bn", keep_base=True, val_fraction=0.0, batch_size=4, steps_per_epoch=25)
)


def resolve_budget(epochs: int | None, minutes: float | None, defaults: Mapping[str, Any] = MappingProxyType({})) -> dict[str, Any]:
    """The ``epochs`` and ``minutes`` of a run from what the user gave (``None``: not given).

    Only minutes: that time, no epoch limit. Only epochs: those epochs, no time limit. Both:
    whichever ends first. Neither: ``defaults``' budget, else :class:`TrainConfig`'s.
    """
    if epochs is None and minutes is None:
        return {name: defaults.get(name, default(name)) for name in BUDGET_LIMITS}
    return {"epochs": epochs, "minutes": minutes}


def finetune_config(epochs: int | None = None, minutes: float | None = None, **overrides: Any) -> TrainConfig:
    """:data:`FINETUNE_DEFAULTS` with ``overrides`` (``None`` values keep the default) and the
    budget :func:`resolve_budget` makes of ``epochs`` and ``minutes``."""
    values = dict(FINETUNE_DEFAULTS)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values | resolve_budget(epochs, minutes, FINETUNE_DEFAULTS))
