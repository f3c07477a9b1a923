"""Where the network runs: the devices usable here, the choice of one, and out-of-memory errors.

``auto`` is cuda > mps > cpu; an explicit device that is not available is an error that lists
the ones that are. :func:`is_out_of_memory` recognises the memory failures of every backend
(CUDA, the CPU allocator, onnxruntime's after :class:`~src_models.inference.Segmenter` renames
them), so the Segmenter's retry policy can tell them from real errors.
"""

from __future__ import annotations

import torch

from .errors import R2UNetError

DEVICE_KINDS = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Devices usable here, best first, always ending with ``cpu``."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda > mps > cpu; an explicit device that is not available is an error."""
    name = str(device)
    if name == "auto":
        return torch.device(available_devices()[0])
    kind = name.split(":")[0]
    if kind not in DEVICE_KINDS:
        raise R2UNetError(f"device {name!r} is unknown; use auto, cuda, mps or cpu")
    if kind not in available_devices():
        raise R2UNetError(f"device {name!r} is not available here; available: {', '.join(available_devices())}")
    return torch.device(name)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a memory failure (worth retrying smaller) rather than a bug."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
