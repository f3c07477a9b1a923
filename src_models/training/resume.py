"""Exact resume, torch-free at import: the run's :class:`TrainState` and its ``.resume.pt`` file.

Beside the best checkpoint ``OUT.safetensors`` a run keeps ``OUT.resume.pt`` (model, optimizer,
schedule position, step, best score, history, torch RNG) and ``OUT.history.json`` (one record per
epoch). :func:`save_resume` writes the first atomically; :func:`load_resume` checks that the
saved run trains the same model with the same settings (only the budget and the patience may
change) and restores it, so the resumed run continues with the very patches and steps it would
have taken. :func:`saved_budget` reads the saved run's budget (a resume that gives none keeps it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import R2UNetError
from ..fileio import atomic_write
from .config import TrainConfig

if TYPE_CHECKING:
    from .trainer import Trainer

RESUME_FORMAT = "napari-r2unet.resume/1"
BUDGET_FIELDS = ("epochs", "minutes", "patience")  # the settings a resumed run may change


@dataclass
class TrainState:
    """Where a run is: everything besides the weights and the optimizer that a resume restores."""

    step: int = 0
    epoch: int = 0  # completed epochs
    best_score: float = -math.inf
    best_epoch: int = -1
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_loss_sum: float = 0.0  # the current epoch's losses so far (exact across a mid-epoch resume)
    epoch_loss_count: int = 0
    steps_per_epoch: int = 0
    lr_anchor_step: int = 0  # a resume with another budget continues the decay from this step ...
    lr_anchor_s: float = 0.0  # ... and elapsed time ...
    lr_anchor_factor: float = -1.0  # ... starting at this factor (-1: no anchor)
    saved_by_this_run: bool = False
    base_metrics: dict[str, float] = field(default_factory=dict)  # the base model on the validation images
    created: str = ""  # when the run started (ISO date); a resumed run keeps it


def resume_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".resume.pt")


def history_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".history.json")


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    text = json.dumps(history, indent=1)
    atomic_write(history_path(out), lambda tmp: Path(tmp).write_text(text), suffix=".json")


def save_resume(trainer: Trainer) -> None:
    import torch

    payload = {
        "format": RESUME_FORMAT,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "state": dataclasses.asdict(trainer.state) | {"history": json.dumps(trainer.state.history)},
        "train_config": json.dumps(trainer.config.to_dict()),
        "model_config": trainer.model_config.to_json(),
        "torch_rng": torch.get_rng_state(),
    }
    atomic_write(resume_path(trainer.out), lambda tmp: torch.save(payload, tmp), suffix=".pt")


def _read_payload(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise R2UNetError(f"nothing to resume: {path} does not exist (start without --resume)")
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise R2UNetError(f"cannot resume from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT:
        raise R2UNetError(f"cannot resume from {path}: not a napari-r2unet resume file")
    return payload


def saved_budget(out: Path) -> dict[str, Any]:
    """The ``epochs`` and ``minutes`` of the run whose ``.resume.pt`` lies beside ``out``."""
    saved = json.loads(_read_payload(resume_path(Path(out)))["train_config"])
    return {"epochs": saved.get("epochs", TrainConfig().epochs), "minutes": saved.get("minutes")}


def load_resume(trainer: Trainer) -> None:
    """Restore ``trainer`` from its ``.resume.pt``; refuse a run of another model or other settings."""
    import torch

    path = resume_path(trainer.out)
    payload = _read_payload(path)
    if payload["model_config"] != trainer.model_config.to_json():
        raise R2UNetError(f"cannot resume from {path}: it trains a different model ({payload['model_config']})")
    saved = json.loads(payload["train_config"])
    # a setting the saved run predates had its default then
    defaults = TrainConfig().to_dict()
    differs = sorted(k for k, v in trainer.config.to_dict().items() if saved.get(k, defaults[k]) != v and k not in BUDGET_FIELDS)
    if differs:
        raise R2UNetError(f"cannot resume from {path}: training settings differ ({', '.join(differs)}); only --epochs/--minutes/--patience may change")
    raw = dict(payload["state"])
    raw["history"] = json.loads(raw["history"])
    known = {f.name for f in dataclasses.fields(TrainState)}
    restored = TrainState(**{k: v for k, v in raw.items() if k in known})
    if restored.steps_per_epoch and restored.steps_per_epoch != trainer.steps_per_epoch:
        raise R2UNetError(f"cannot resume from {path}: it used {restored.steps_per_epoch} steps per epoch, this data gives {trainer.steps_per_epoch}; use the same images")
    trainer.model.load_state_dict(payload["model"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    epochs = saved.get("epochs", defaults["epochs"])  # None: the saved run had no epoch limit
    previous_budget = (epochs * trainer.steps_per_epoch if epochs else None, saved.get("minutes"))
    trainer.state = restored
    trainer.state.saved_by_this_run = False
    if previous_budget != (trainer.total_steps, trainer.config.minutes):
        if trainer._progress(previous_budget) < 1.0:
            # stopped part-way, with a new budget: keep the current learning rate and decay from there (no warm restart)
            trainer.state.lr_anchor_factor = trainer._lr_factor(previous_budget)
            trainer.state.lr_anchor_step, trainer.state.lr_anchor_s = trainer.state.step, trainer.state.elapsed_s
        else:
            # a run that used up its budget had decayed its learning rate to 0: anchored there, every step of the
            # longer budget trained at 0 and changed nothing. The new budget's own schedule takes over, as if it had
            # been planned from the start (at 10 of 20 epochs: half the base rate, decaying to 0)
            trainer.state.lr_anchor_factor, trainer.state.lr_anchor_step, trainer.state.lr_anchor_s = -1.0, 0, 0.0
    torch.set_rng_state(payload["torch_rng"])
