"""The one event stream of training, torch-free: :class:`EventKind` and :class:`TrainEvent`.

:meth:`Trainer.run <src_models.training.trainer.Trainer.run>` yields :class:`TrainEvent` items;
the CLI, the napari widget, the benchmarks and the tests all consume them. ``EventKind`` is a
``str``-valued enum, so ``event.kind == "step"`` and ``event.kind == EventKind.STEP`` both hold.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class EventKind(str, enum.Enum):
    """What happened. A run yields START, BASELINE (fine-tuning with validation only), then STEP
    and EPOCH (and CHECKPOINT when the best model was saved), and ends with one final kind:
    DONE (the budget ended: its epochs or its minutes), CANCELLED or EARLY_STOP."""

    START = "start"
    BASELINE = "baseline"  # the base model's validation metrics, before any step
    STEP = "step"
    EPOCH = "epoch"
    CHECKPOINT = "checkpoint"
    DONE = "done"
    CANCELLED = "cancelled"
    EARLY_STOP = "early_stop"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        """True for the kinds that end a run (done, cancelled, early_stop)."""
        return self in FINAL_KINDS


FINAL_KINDS = frozenset({EventKind.DONE, EventKind.CANCELLED, EventKind.EARLY_STOP})
# why a run ended (a final event's ``reason``): its epochs are done, its minutes are spent, no
# improvement for ``patience`` epochs, or the user cancelled
STOP_REASONS = ("epochs", "time", "early_stop", "cancelled")


@dataclass
class TrainEvent:
    """One item of the event stream (see :class:`EventKind`).

    ``epoch``: the epochs completed; ``epochs`` and ``total_steps``: the budget's, ``None`` for a
    run with no epoch limit (a time budget only: ``fraction`` and ``eta_s`` then follow the clock).
    A final event says in ``reason`` (one of :data:`STOP_REASONS`) and ``message`` why it ended.
    """

    kind: EventKind
    step: int
    total_steps: int | None
    epoch: int
    epochs: int | None
    loss: float | None = None
    lr: float | None = None
    metrics: dict[str, float] | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    path: str | None = None
    message: str = ""
    fraction: float = 0.0  # of the budget (steps or minutes, whichever is further along)
    reason: str = ""  # final events only: one of STOP_REASONS

    def __post_init__(self) -> None:
        self.kind = EventKind(self.kind)  # also refuses a kind that does not exist
