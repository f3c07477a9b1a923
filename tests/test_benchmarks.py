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


def test_task_results_replaces_only_its_own_section(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("task_results", Path(__file__).parents[1] / "benchmarks" / "task_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results on DRIVE\n\n| a |\n\n## Fine-tuning on a new kind of image\n\ntext\n")
    module.write_section(["first"], results)
    module.write_section(["second", "", "### sub", "rows"], results)
    text = results.read_text()
    assert text.count(module.HEADING) == 1 and "first" not in text and "### sub\nrows" in text
    assert text.startswith("# Results on DRIVE") and "## Fine-tuning on a new kind of image\n\ntext\n" in text
    results.write_text(text + "\n## Later section\n\nkept\n")
    module.write_section(["third"], results)
    assert "## Later section\n\nkept" in results.read_text() and "second" not in results.read_text()
