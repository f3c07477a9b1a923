"""The ONNX graph cache stays bounded: every fine-tuned version adds a graph, the least recently
used ones go first, the one in use never."""

from __future__ import annotations

import os

import pytest

from src_models.checkpoint import load_checkpoint
from src_models.errors import R2UNetError


def _graph(folder, name: str, size: int, age_s: float):
    path = folder / name
    path.write_bytes(b"x" * size)
    stamp = 1_700_000_000 - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_prune_deletes_the_least_recently_used_graphs_down_to_the_limit(tmp_path, monkeypatch):
    from src_models.export import CACHE_LIMIT_ENV, prune_cache

    oldest = _graph(tmp_path, "a-code-opset17.onnx", 400_000, 300)
    old_opt = _graph(tmp_path, "a-code-opset17-ort1-cpu.opt.onnx", 400_000, 290)
    middle = _graph(tmp_path, "b-code-opset17.onnx", 400_000, 200)
    newest = _graph(tmp_path, "c-code-opset17.onnx", 400_000, 100)
    in_use = _graph(tmp_path, "d-code-opset17.onnx", 400_000, 400)  # older than all, but kept
    in_use_opt = _graph(tmp_path, "d-code-opset17-ort1-cpu.opt.onnx", 400_000, 400)
    writing = _graph(tmp_path, ".e-code-opset17.onnx.tmp1.onnx", 400_000, 500)  # another process's export in progress
    other = tmp_path / "notes.txt"
    other.write_text("not a graph")
    monkeypatch.setenv(CACHE_LIMIT_ENV, str(1_700_000 / 2**20))  # room for 4 of the 6
    deleted = prune_cache(tmp_path, keep=(in_use,))
    assert deleted == [oldest, old_opt]
    assert all(p.exists() for p in (middle, newest, in_use, in_use_opt, other, writing))
    assert prune_cache(tmp_path, keep=(in_use,)) == []  # within the limit now
    monkeypatch.setenv(CACHE_LIMIT_ENV, "0")
    assert prune_cache(tmp_path, keep=(in_use,)) == [middle, newest]
    assert in_use.exists() and in_use_opt.exists()


def test_a_graph_and_its_optimised_copy_are_pruned_together(tmp_path, monkeypatch):
    """A fresh process loads only the optimised copy, so the base graph's own time can be old while
    the export is in daily use: deleting it alone would make both be built again."""
    from src_models.export import CACHE_LIMIT_ENV, prune_cache

    base = _graph(tmp_path, "a-code-opset17.onnx", 400_000, 900)  # written long ago
    base_opt = _graph(tmp_path, "a-code-opset17-ort1-cpu.opt.onnx", 400_000, 10)  # used a moment ago
    other = _graph(tmp_path, "b-code-opset17.onnx", 400_000, 500)
    other_opt = _graph(tmp_path, "b-code-opset17-ort1-cpu.opt.onnx", 400_000, 400)
    monkeypatch.setenv(CACHE_LIMIT_ENV, str(1_000_000 / 2**20))  # room for one export of two files
    assert prune_cache(tmp_path) == [other, other_opt]
    assert base.exists() and base_opt.exists()


def test_openvinos_marked_graph_goes_with_its_export(tmp_path, monkeypatch):
    """The OpenVINO IR (.xml and .bin, src_models.openvino_backend) is one more copy of an export:
    pruned with it, renewing it when used."""
    from src_models.export import CACHE_LIMIT_ENV, prune_cache

    base = _graph(tmp_path, "a-code-opset17.onnx", 300_000, 900)
    xml = _graph(tmp_path, "a-code-opset17-ov2026.4.1-bf16.xml", 100_000, 10)  # used a moment ago
    weights = _graph(tmp_path, "a-code-opset17-ov2026.4.1-bf16.bin", 300_000, 10)
    other = _graph(tmp_path, "b-code-opset17.onnx", 300_000, 500)
    other_xml = _graph(tmp_path, "b-code-opset17-ov2026.4.1-bf16.xml", 100_000, 450)
    other_weights = _graph(tmp_path, "b-code-opset17-ov2026.4.1-bf16.bin", 300_000, 450)
    monkeypatch.setenv(CACHE_LIMIT_ENV, str(800_000 / 2**20))  # room for one export and its IR
    assert prune_cache(tmp_path) == [other, other_xml, other_weights]
    assert base.exists() and xml.exists() and weights.exists()


def test_a_bad_cache_limit_is_one_clear_error(monkeypatch):
    from src_models.export import CACHE_LIMIT_ENV, cache_limit_bytes

    monkeypatch.setenv(CACHE_LIMIT_ENV, "two gigabytes")
    with pytest.raises(R2UNetError, match=rf"^{CACHE_LIMIT_ENV}='two gigabytes' is not a number of megabytes"):
        cache_limit_bytes()
    monkeypatch.delenv(CACHE_LIMIT_ENV)
    assert cache_limit_bytes() == 2048 * 2**20


def test_using_a_cached_graph_renews_it_and_prunes_the_others(trained_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from src_models.export import CACHE_ENV, CACHE_LIMIT_ENV, OnnxPredictor

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    checkpoint = load_checkpoint(trained_checkpoint)
    predictor = OnnxPredictor(checkpoint)
    size = predictor.path.stat().st_size
    os.utime(predictor.path, (1_600_000_000, 1_600_000_000))  # made long ago
    folder = predictor.path.parent
    others = [_graph(folder, f"{i:032d}-code-opset17.onnx", size, 1000 - i) for i in range(3)]
    monkeypatch.setenv(CACHE_LIMIT_ENV, str(2.5 * size / 2**20))  # room for 2 graphs of this size
    again = OnnxPredictor(checkpoint)
    assert again.path == predictor.path and again.path.stat().st_mtime > 1_700_000_000  # renewed by the use
    assert [p.exists() for p in others] == [False, False, True]  # the two least recently used went
    assert again(__import__("numpy").zeros((1, 1, 32, 32), "float32")).shape == (1, 1, 32, 32)
