"""Compiled PyTorch networks for inference: ``torch.compile`` (inductor, frozen weights) on the CPU.

What runs: a copy of the network with each recurrent step's batch norm folded into its own copy
of the conv (:func:`src_models.nets.fold_batch_norms`), compiled with static shapes; in bf16 its
first block's recurrent layers run split (:func:`src_models.precision.split_bf16_first_block`).
What it buys, measured on a 2-core Xeon with AMX (r2unet-drive, 2 threads, ``make bench``
2026-12-07): a bf16 DRIVE image takes 0.128 s end to end compiled (about 0.11 s of it the
network) against 0.32 s eager bf16 and 0.374 s in onnxruntime fp32 (inductor runs oneDNN's prepacked
convolutions with the ReLUs and residual adds fused in; docs/BENCHMARKS.md). What it costs:
10-30 s of compilation per input shape (static shapes: a dynamic-shape graph compiled slower and
ran 25 % slower), once per process. So it is for long bf16 runs: the CLI compiles when a run will
use bf16 and is large enough to repay it (:func:`resolve_compile`), or when asked
(``--compile on``); elsewhere eager PyTorch or onnxruntime run.

Inductor writes C++ and needs the compiler it looks for (``$CXX``, else ``g++``; ``clang++`` on macOS)
and Python's headers: without them,
or when compilation fails for any other reason, the caller runs the eager network and says why
(:class:`CompiledNetwork`).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import R2UNetError

COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_ENV = "R2UNET_COMPILE"  # replaces --compile auto (on | off)
# a run large enough to repay 10-30 s of compilation, in image pixels (every plane, tiles'
# overlaps not counted). Measured through the CLI on the AMX Xeon (2026-12-07, r2unet-drive, the
# batch norms folded and the first block in split bf16): 80 DRIVE-sized images (0.33 MP each) took
# 24.0-25.5 s compiled (bf16; the compile took about 8 s with inductor's on-disk cache warm)
# against 33.8-34.0 s in onnxruntime fp32, about 0.2 s saved per image after compiling, so a cold
# compile (13-33 s) is repaid after 60-150 such images; one 8192^2 image (67 MP) took 69 s compiled
# against 112 s. The threshold: 128 DRIVE images.
DRIVE_PIXELS = 584 * 565
COMPILE_MIN_PIXELS = 128 * DRIVE_PIXELS  # 42.2 MP
# input shapes compiled per network at most: a folder of images of many sizes would otherwise
# compile each one (10-30 s apiece); shapes beyond these run uncompiled
MAX_SHAPES = 4


def compiler_available() -> bool:
    """Whether inductor can build here: the C++ compiler it uses (``$CXX``, else ``g++``, ``clang++``
    on macOS) and ``Python.h``."""
    cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    include = sysconfig.get_paths().get("include")
    return bool(shutil.which(cxx)) and bool(include) and Path(include, "Python.h").is_file()


def check_compile(choice: str) -> str:
    if choice not in COMPILE_CHOICES:
        raise R2UNetError(f"compile {choice!r} must be one of {', '.join(COMPILE_CHOICES)}")
    return choice


def worth_compiling(files: Sequence[Path]) -> bool:
    """``--compile auto``'s rule: the run's images hold COMPILE_MIN_PIXELS pixels or more, read
    from their headers until that many are counted (a file whose size its header does not tell, a
    DICOM or NIfTI one, counts as a DRIVE-sized image)."""
    from .data import image_pixels

    total = 0
    for path in files:
        pixels = image_pixels(path)
        total += DRIVE_PIXELS if pixels is None else pixels
        if total >= COMPILE_MIN_PIXELS:
            return True
    return False


def resolve_compile(choice: str, files: Sequence[Path] = (), bf16: bool = True) -> bool:
    """Whether a run compiles: ``$R2UNET_COMPILE`` replaces ``auto``; auto compiles runs that
    :func:`worth_compiling` and that will run bf16 (``bf16``): in float32, onnxruntime was faster
    than the compiled network (0.29-0.33 s against 0.36 s on the AMX Xeon), so auto leaves it to it."""
    check_compile(choice)
    if choice == "auto":
        choice = check_compile(os.environ.get(COMPILE_ENV) or "auto")
    if choice == "auto":
        return bf16 and worth_compiling(files) and compiler_available()
    return choice == "on"


class CompiledNetwork:
    """``network`` compiled by inductor, called like it; on the first failure of compilation it
    runs ``eager`` (default: ``network`` itself) from then on and calls ``log`` once with the
    reason. Each new input shape compiles once (``log`` says so: the pause is not a hang), up to
    :data:`MAX_SHAPES`; later shapes run ``eager``. The Segmenter compiles a folded, partly split
    copy of its model and passes the model itself as ``eager``, so that every tile of an image
    runs either that copy compiled or the model.

    Inductor's ``freezing`` folds the eval-mode weights into the graph: call it under
    ``torch.no_grad()`` / ``torch.inference_mode()`` only (inference). It is switched on
    process-wide for the duration of each call."""

    def __init__(self, network: Any, log: Callable[[str], None], eager: Callable[[Any], Any] | None = None) -> None:
        import torch

        self.network = network
        self.eager = eager if eager is not None else network
        self.log = log
        # static shapes: a dynamic-shape graph ran 25 % slower; each new tile shape compiles once.
        # Freezing is switched on around each call (__call__), not through compile's options: passed
        # as options={"freezing": True}, inductor (torch 2.13) still ran aten convolutions with
        # separate elementwise kernels, without oneDNN's prepacked, fused ones (0.174 against
        # 0.159 s for a bf16 DRIVE image, AMX Xeon)
        self._compiled: Any = torch.compile(network, dynamic=False)
        self.failed = False
        self.shapes: set[tuple[int, ...]] = set()  # input shapes compiled (or being compiled)
        self._said_limit = False

    def __call__(self, x: Any) -> Any:
        if self._compiled is None:
            return self.eager(x)
        shape = tuple(x.shape)
        if shape not in self.shapes:
            if len(self.shapes) >= MAX_SHAPES:
                if not self._said_limit:
                    self.log(f"{MAX_SHAPES} input shapes compiled already: inputs of other shapes run uncompiled")
                    self._said_limit = True
                return self.eager(x)
            self.shapes.add(shape)
            self.log(f"compiling the network for {shape[-2]} x {shape[-1]} inputs (once per shape; 10-30 s on 2 cores)")
        from torch._inductor import config as inductor_config

        from .devices import is_out_of_memory

        try:
            with inductor_config.patch(freezing=True):
                return self._compiled(x)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # inductor's errors (no compiler, unsupported op) are of many kinds
            if is_out_of_memory(exc):  # the tiler retries smaller, compiled
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            self.log(f"torch.compile failed ({first}); running the network uncompiled")
            self._compiled, self.failed = None, True
            return self.eager(x)


__all__ = ["COMPILE_CHOICES", "COMPILE_ENV", "COMPILE_MIN_PIXELS", "DRIVE_PIXELS", "MAX_SHAPES", "CompiledNetwork", "check_compile", "compiler_available", "resolve_compile",
           "worth_compiling"]
