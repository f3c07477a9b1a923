"""Numeric precision of inference and training: fp32, bf16, or auto (the machine and the card decide).

bfloat16 halves the bytes of every activation and, on CPUs with AMX tiles (``amx_bf16``) or
AVX-512 BF16 (``avx512_bf16``), runs the convolutions on units that fp32 leaves idle. Without
them oneDNN emulates bf16 with conversions, slower than fp32: ``auto`` then stays at fp32.

- ``auto``: on a CUDA device, mixed precision (bf16 where supported, else fp16) as before; on a
  CPU, bf16 only where the CPU has native bf16 *and* the model card says the weights were
  validated in bf16 (``card.bf16``: masks agree with fp32 on >= 99.9 % of pixels and the test F1
  moved by <= 0.002; ``benchmarks/precision_check.py`` measures it) *and* the network runs
  compiled (eager bf16 is no faster than onnxruntime's fp32 there); fp32 elsewhere. Training
  (autocast through autograd: 1.8x faster steps on AMX) needs no compilation.
- ``fp32``: float32 everywhere (the tests' precision).
- ``bf16``: bf16 autocast wherever asked, emulated or not (a notice says when it is emulated).

The CPU's flags come from ``/proc/cpuinfo`` (Linux) or ``sysctl`` (macOS: Apple M2 and later
report ``hw.optional.arm.FEAT_BF16``); torch is imported only to ask CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import R2UNetError

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86; ARM Linux reports "bf16" in Features


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (lower case; empty where they cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].lower().split())
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
            if out.stdout.strip() == "1":
                return frozenset({"bf16"})
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS) or "bf16" in flags


def check_precision(precision: str, name: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise R2UNetError(f"{name} {precision!r} must be one of {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str, device_type: str, card_allows_bf16: bool,
                      flags: frozenset[str] | None = None, name: str = "precision", fast: bool = True) -> tuple[str, str]:
    """The precision a run uses (``fp32``, ``bf16`` or, on CUDA under auto, ``amp``) and a line
    saying why (empty when there is nothing to say). ``name`` names the setting in errors.
    ``fast``: whether a fast bf16 engine runs the network, OpenVINO
    (:mod:`src_models.openvino_backend`) or the compiled PyTorch network (:mod:`src_models.compiled`);
    on a CPU, auto picks bf16 only then: eager PyTorch bf16 ran no faster than onnxruntime's
    float32 (0.32 s against 0.37 s on the AMX Xeon, DRIVE image), OpenVINO 0.11 s, compiled 0.13 s."""
    check_precision(precision, name)
    if precision == "fp32":
        return "fp32", ""
    if device_type == "cuda":
        if precision == "auto":
            return "amp", ""
        import torch

        if not torch.cuda.is_bf16_supported():
            raise R2UNetError("this GPU has no bf16; use --precision auto (float16 mixed precision) or fp32")
        return "bf16", ""
    native = cpu_has_native_bf16(flags) if device_type == "cpu" else False  # MPS: fp32 unless asked
    if precision == "bf16":
        if device_type == "cpu" and not native:
            return "bf16", "bf16 asked for, but this CPU has no native bf16 (AMX or AVX-512 BF16): it is emulated, slower than fp32"
        return "bf16", ""
    if device_type == "cpu" and native and card_allows_bf16 and fast:
        return "bf16", "precision auto: bf16 (this CPU has native bf16 and the model card validates it)"
    return "fp32", ""


def keep_float32_ends(model: Any) -> Any:
    """``model`` (a U-Net-family network) with its first block and its head outside bf16
    autocast: they see the raw image's fine detail at full resolution and write the final logits,
    where bf16's 8-bit mantissa flips thin-vessel pixels. Measured on DRIVE 01 with r2unet-drive:
    all in bf16, masks agree with fp32 on 99.86 % of the FOV; first block and head in fp32,
    99.99 % (max probability difference 0.45 -> 0.012), for about a ninth of the FLOPs in fp32.

    The first block hands its output on in bf16: what reads it (max pooling, the skip's 1x1 conv
    after the concatenation) rounded it to bf16 anyway, so the logits are bit for bit the same, and
    a compiled graph saves a float32 copy at full resolution (compiled, AMX Xeon, one process,
    alternating: 0.174 against 0.191 s per DRIVE image, best of 6)."""
    import torch
    from torch import nn

    class Float32(nn.Module):
        def __init__(self, inner: nn.Module, out_dtype: Any = None) -> None:
            super().__init__()
            self.inner = inner
            self.out_dtype = out_dtype

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                y = self.inner(x.float())
            return y if self.out_dtype is None else y.to(self.out_dtype)

    if hasattr(model, "encoder") and hasattr(model, "head"):
        # with one level the block feeds the float32 head directly: no bf16 hand-on then
        model.encoder[0] = Float32(model.encoder[0], torch.bfloat16 if len(model.encoder) > 1 else None)
        model.head = Float32(model.head)
    return model


def split_bf16_first_block(model: Any) -> Any:
    """``model`` (made by :func:`keep_float32_ends`, then folded by
    :func:`src_models.nets.fold_batch_norms`) with the folded recurrent layers of its float32
    first block run as :class:`src_models.nets.SplitBF16RecurrentConv`: bf16 arithmetic that keeps
    its inputs' float32 detail (for compiled inference; eager, it is slower than float32). Measured over the 20 DRIVE
    test images (r2unet-drive, compiled, AMX Xeon): masks agree with fp32 on 99.957 % of the FOV,
    against 99.90 % with those layers in plain bf16 and 99.984 % in float32; 0.125 against 0.148 s
    per forward (one process, alternating, median of 8)."""
    from .nets import FoldedRecurrentConv, SplitBF16RecurrentConv

    first = getattr(getattr(model, "encoder", [None])[0], "inner", None)
    if first is not None:
        for name, child in list(first.named_children()):
            if isinstance(child, FoldedRecurrentConv):
                setattr(first, name, SplitBF16RecurrentConv(child))
    return model


def autocast(device: Any, precision: str) -> Any:
    """The autocast context of a resolved precision (a null context for fp32)."""
    import torch

    if precision == "fp32" or (precision == "amp" and torch.device(device).type != "cuda"):
        return contextlib.nullcontext()
    if precision == "amp":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=dtype)


__all__ = ["PRECISIONS", "autocast", "keep_float32_ends", "split_bf16_first_block", "check_precision", "cpu_flags", "cpu_has_native_bf16", "resolve_precision"]
