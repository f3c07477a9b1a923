"""The benchmark suite runs (tiny sizes): `make bench` cannot rot unnoticed. Speed is judged by the
benchmark's ratios, never here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_prints_every_ratio():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--threads", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for marker in ("sgemm:", "(a) predict", "x the roofline", "(b) eager PyTorch forward", "(c) predict 1024^2", "peak RSS", "(d) training"):
        assert marker in result.stdout, (marker, result.stdout[-2000:])
