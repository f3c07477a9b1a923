"""What runs in the worker thread: load the model (torch is imported here, never at start-up),
predict, report progress, stop when asked.

- :func:`segment`: one :class:`~napari_r2unet._layers.Job` (the Segment widget);
- :func:`segment_all`: several jobs with one model, progress over all of them (the Fine-tune
  widget's "Re-segment other images").

Thread use: on the CPU, torch gets all cores but one (at least one), so napari's event loop keeps
a core and the GUI stays responsive while a model runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ._layers import Job


class SegmenterCache:
    """Loaded models of one widget, by (model, device); loading a checkpoint once per choice."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, bool, str], Any] = {}

    def get(self, spec: str, device: str, log: Callable[[str], None], tta: bool = False, scale: str = "auto") -> Any:
        key = (spec, device, tta, scale)
        if key not in self._cache:
            from src_models.inference import Segmenter
            from src_models.model_names import load_model

            self._cache.clear()  # keep one model in memory
            self._cache[key] = Segmenter(load_model(spec), device=device, log=log, tta=tta, scale=scale)
        return self._cache[key]


def limit_cpu_threads() -> int:
    import torch

    threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    return threads


def available_devices() -> list[str]:
    from src_models.devices import available_devices as devices

    return devices()


def segment(cache: SegmenterCache, spec: str, device: str, job: Job,
            progress: Callable[[float], None], should_stop: Callable[[], bool],
            log: Callable[[str], None]) -> tuple[np.ndarray, str]:
    """Probabilities ``(K, H, W)`` (or ``(..., K, H, W)`` for all slices) and the model's name."""
    if device in ("auto", "cpu"):
        limit_cpu_threads()  # before the model loads: onnxruntime sizes its thread pool from it
    segmenter = cache.get(spec, device, log, tta=job.tta, scale=job.scale)
    if segmenter.device.type == "cpu":
        limit_cpu_threads()
    predict = segmenter.predict_stack if job.stack else segmenter.predict
    probs = predict(job.data, channel_axis=job.channel_axis, tile=job.tile, overlap=job.overlap,
                    progress=progress, should_stop=should_stop)
    return np.asarray(probs), segmenter.checkpoint.name


def segment_all(cache: SegmenterCache, spec: str, jobs: list[Job],
                progress: Callable[[float], None], should_stop: Callable[[], bool],
                log: Callable[[str], None]) -> list[tuple[np.ndarray, str]]:
    """:func:`segment` each job in turn with one model (device auto); ``progress`` covers them all."""
    results = []
    for i, job in enumerate(jobs):
        def part(fraction: float, i: int = i) -> None:
            progress((i + fraction) / len(jobs))

        results.append(segment(cache, spec, "auto", job, part, should_stop, log))
    return results
