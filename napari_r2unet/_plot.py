"""A small live plot of training curves, drawn with QPainter (no plotting library needed).

Two series share the x axis (training step): the training loss (left axis, scaled to its range,
drawn as a light per-step trace plus a running mean) and the validation Dice/F1 (right axis,
0..1, one marker per epoch, the base model's score at step 0 as a dashed line).
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

LOSS_COLOR = QColor(90, 170, 255)
MEAN_COLOR = QColor(255, 255, 255)
DICE_COLOR = QColor(255, 190, 40)
BASE_COLOR = QColor(200, 120, 255)
SMOOTHING = 0.9  # exponential moving average of the loss


class CurvePlot(QWidget):
    """Loss per step and validation Dice per epoch, redrawn as points arrive."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.clear()

    def clear(self) -> None:
        self.loss: list[tuple[float, float]] = []
        self.smooth: list[tuple[float, float]] = []
        self.dice: list[tuple[float, float]] = []
        self.base_dice: float | None = None
        self.total_steps = 1  # the step at the right end of the x axis
        self.projected = False  # True: that step is projected from the clock (a run with no epoch limit)
        self.update()

    def add_loss(self, step: int, loss: float, total_steps: int | None, fraction: float = 0.0) -> None:
        """The loss of ``step``; ``total_steps`` None (no epoch limit, a time budget): the axis ends
        at the step the run reaches at this pace when the budget is spent (``fraction`` of it now)."""
        self.projected = total_steps is None
        if total_steps is None:
            total_steps = round(step / fraction) if fraction > 0 else step
        self.total_steps = max(1, step, total_steps)
        if not math.isfinite(loss):
            return
        previous = self.smooth[-1][1] if self.smooth else loss
        self.loss.append((step, loss))
        self.smooth.append((step, SMOOTHING * previous + (1 - SMOOTHING) * loss if self.smooth else loss))
        self.update()

    def add_dice(self, step: int, dice: float) -> None:
        if math.isfinite(dice):
            self.dice.append((step, dice))
            self.update()

    def set_base_dice(self, dice: float) -> None:
        self.base_dice = dice if math.isfinite(dice) else None
        self.update()

    # -- drawing -------------------------------------------------------------------------
    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        w, h = self.width(), self.height()
        left, right, top, bottom = 44, 36, 18, 20
        area = QRectF(left, top, max(10, w - left - right), max(10, h - top - bottom))
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        painter.setPen(QPen(QColor(110, 110, 120), 1))
        painter.drawRect(area)
        font = painter.font()
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.8))
        painter.setFont(font)

        def x_of(step: float) -> float:
            return area.left() + area.width() * min(1.0, step / self.total_steps)

        # loss: left axis, from 0 to the largest value seen
        top_loss = max((v for _, v in self.loss), default=1.0) or 1.0

        def y_loss(value: float) -> float:
            return area.bottom() - area.height() * max(0.0, min(1.0, value / top_loss))

        def y_dice(value: float) -> float:
            return area.bottom() - area.height() * max(0.0, min(1.0, value))

        painter.setPen(QPen(LOSS_COLOR.darker(150), 1))
        self._polyline(painter, [QPointF(x_of(s), y_loss(v)) for s, v in self.loss])
        painter.setPen(QPen(MEAN_COLOR, 1.6))
        self._polyline(painter, [QPointF(x_of(s), y_loss(v)) for s, v in self.smooth])
        if self.base_dice is not None:
            pen = QPen(BASE_COLOR, 1.2)
            pen.setStyle(Qt.DashLine)
            painter.setPen(pen)
            y = y_dice(self.base_dice)
            painter.drawLine(QPointF(area.left(), y), QPointF(area.right(), y))
        painter.setPen(QPen(DICE_COLOR, 2))
        points = [QPointF(x_of(s), y_dice(v)) for s, v in self.dice]
        self._polyline(painter, points)
        painter.setBrush(DICE_COLOR)
        for p in points:
            painter.drawEllipse(p, 2.5, 2.5)

        # axes labels and legend
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(QRectF(0, area.top() - 6, left - 4, 14), Qt.AlignRight, f"{top_loss:.2g}")
        painter.drawText(QRectF(0, area.bottom() - 8, left - 4, 14), Qt.AlignRight, "0")
        painter.drawText(QRectF(area.right() + 4, area.top() - 6, right, 14), Qt.AlignLeft, "1")
        painter.drawText(QRectF(area.right() + 4, area.bottom() - 8, right, 14), Qt.AlignLeft, "0")
        painter.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), 16), Qt.AlignRight, f"step {'~' if self.projected else ''}{self.total_steps}")
        legend = [(MEAN_COLOR, "loss"), (DICE_COLOR, "val Dice")] + ([(BASE_COLOR, "base")] if self.base_dice is not None else [])
        x = area.left() + 4
        for color, text in legend:
            painter.setPen(QPen(color, 2))
            painter.drawLine(QPointF(x, 9), QPointF(x + 12, 9))
            painter.setPen(QColor(220, 220, 220))
            painter.drawText(QPointF(x + 15, 13), text)
            x += 22 + painter.fontMetrics().horizontalAdvance(text)
        painter.end()

    @staticmethod
    def _polyline(painter: QPainter, points: list[QPointF]) -> None:
        for a, b in zip(points, points[1:]):
            painter.drawLine(a, b)
