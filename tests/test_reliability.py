"""Reliability: the bad-input matrix (engine API, CLI, both widgets), property tests, a fuzz test
of the checkpoint loader, kill-and-resume, nothing lost on failed writes, concurrency.

docs/RELIABILITY.md lists every case with the test that covers it; the ids below are its rows.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import docked_finetune, random_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from src_models.checkpoint import load_checkpoint
from src_models.cli import main
from src_models.errors import R2UNetError
from src_models.inference import Segmenter
from src_models.preprocessing import PreprocessConfig, measure_stats, normalize_tile, to_chw
from src_models.synthetic import vessel_image

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
HUGE = np.broadcast_to(np.zeros((1, 1), np.uint8), (300_000, 300_000))  # 90 GB of pixels, 1 byte of memory


def _with(value: float, fraction: float = 0.3) -> np.ndarray:
    x = RNG.random((40, 40)).astype(np.float32)
    x[RNG.random((40, 40)) < fraction] = value
    return x


# id -> (array, None if it must segment fine, else a word of the one-line refusal)
IMAGES: dict[str, tuple[np.ndarray, str | None]] = {
    "empty": (np.zeros((0, 0), np.uint8), "empty"),
    "1x1": (np.ones((1, 1), np.uint8), None),
    "1xN": (np.ones((1, 37), np.uint8), None),
    "4d": (RNG.random((2, 3, 24, 24)), "2D image"),
    "5d": (RNG.random((2, 2, 3, 24, 24)), "2D image"),
    "2-channel": (RNG.random((24, 24, 2)), None),
    "4-channel": (RNG.random((24, 24, 4)), None),
    "6-channel": (RNG.random((24, 24, 6)), "channel axis"),
    "bool": (RNG.random((24, 24)) > 0.5, None),
    "int64": (RNG.integers(-(2**40), 2**40, (24, 24)), None),
    "float16": (RNG.random((24, 24)).astype(np.float16), None),
    "float64": (RNG.random((24, 24)), None),
    "float64-beyond-float32": (RNG.random((24, 24)) * 1e300, "float32"),
    "nan-pixels": (_with(np.nan), None),
    "inf-pixels": (_with(np.inf), None),
    "all-nan": (np.full((24, 24), np.nan, np.float32), "finite"),
    "complex": (np.ones((24, 24), np.complex64), "not numeric"),
    "huge-300k": (HUGE, "memory"),
}


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Segmenter:
    return Segmenter(load_checkpoint(random_checkpoint(tmp_path_factory.mktemp("m") / "m.safetensors")), device="cpu")


@pytest.mark.parametrize("case", IMAGES, ids=list(IMAGES))
def test_engine_bad_input_matrix(segmenter, case):
    image, refusal = IMAGES[case]
    if refusal is None:
        probs = segmenter.predict(image)
        h, w = image.shape[:2]
        assert probs.shape == (1, h, w) and np.isfinite(probs).all()
    else:
        with pytest.raises(R2UNetError, match=refusal) as info:
            segmenter.predict(image)
        assert "\n" not in str(info.value)


def test_memory_check_refuses_a_30k_image_when_memory_is_short(segmenter, monkeypatch):
    monkeypatch.setattr("src_models.resources.available_memory", lambda: 2 * 1024**3)
    image = np.broadcast_to(np.zeros((1, 1), np.uint8), (30_000, 30_000))
    with pytest.raises(R2UNetError, match=r"needs about \d+\.\d GiB .* only 2\.0 GiB is free"):
        segmenter.predict(image)


# -- the CLI: files ------------------------------------------------------------------------------
FILE_CASES = [k for k in IMAGES if k not in ("huge-300k", "empty")]


@pytest.mark.parametrize("case", FILE_CASES, ids=FILE_CASES)
def test_cli_bad_input_matrix(case, tmp_path, tiny_checkpoint, capsys):
    image, refusal = IMAGES[case]
    tifffile.imwrite(tmp_path / "in.tif", np.ascontiguousarray(image))
    code = main(["predict", str(tiny_checkpoint), str(tmp_path / "in.tif"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if case in ("4d", "5d"):  # the command line predicts a stack slice by slice
        refusal = None
    if refusal is None:
        assert code == 0, err
        spatial = image.shape if image.ndim != 3 else image.shape[:2]
        assert tifffile.imread(tmp_path / "out" / "in.tif").shape == spatial
    else:
        assert code == 1 and err.count("\n") == 1 and err.startswith("r2unet: error:"), err


@pytest.mark.parametrize(("name", "content"), [
    ("fake.png", b"this is not a picture"),
    ("zero.tif", b""),
    ("html.jpg", b"<html><body>404</body></html>"),
    ("truncated.png", None),
])
def test_cli_non_image_files_with_image_names(name, content, tmp_path, tiny_checkpoint, capsys):
    path = tmp_path / name
    if content is None:
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)
    assert main(["predict", str(tiny_checkpoint), str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path.name) in err and "Traceback" not in err


def test_cli_missing_and_unreadable_paths(tmp_path, tiny_checkpoint, capsys):
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")]) == 1
    assert "nope.png" in capsys.readouterr().err
    folder = tmp_path / "dir.png"
    folder.mkdir()
    assert main(["predict", str(tiny_checkpoint), str(folder), "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["predict", str(tmp_path / "missing.safetensors"), str(folder), "--out", str(tmp_path / "o")]) == 1
    assert "missing.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_full_or_read_only_output_folders_lose_nothing(failure, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """Root ignores permissions, so the folder's refusal is simulated where the OS would give it."""
    Image.fromarray((RNG.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "a.png"), "--out", str(out)]) == 0
    before = (out / "a.tif").read_bytes()
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr("src_models.fileio.os.replace", refuse)
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "a.png"), "--out", str(out), "--threshold", "0.1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and os.strerror(failure) in err and "space and permissions" in err
    assert (out / "a.tif").read_bytes() == before  # the previous output is intact
    assert sorted(p.name for p in out.iterdir()) == ["a.tif"]  # no temporary file left behind
    monkeypatch.setattr("src_models.fileio.tempfile.mkstemp", refuse)
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "a.png"), "--out", str(out)]) == 1
    assert "cannot write in" in capsys.readouterr().err


MASKS = {
    "other-shape": (np.zeros((40, 64), np.uint8), "must match"),
    "labels-0-1-2": (np.tile(np.array([0, 1, 2, 0], np.uint8), (64, 16)), "values 0, 1, 2"),
    "all-background": (np.zeros((64, 64), np.uint8), "nothing to learn"),
    "all-foreground": (np.full((64, 64), 255, np.uint8), None),
    "0-and-7": (np.where(vessel_image((64, 64), seed=1)[1] > 0, 7, 0).astype(np.uint8), None),
}


@pytest.mark.parametrize("case", MASKS, ids=list(MASKS))
def test_cli_mask_matrix_for_training_and_evaluation(case, tmp_path, tiny_checkpoint, capsys):
    mask, refusal = MASKS[case]
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(vessel_image((64, 64), seed=1)[0]).save(tmp_path / "img" / "a.png")
    Image.fromarray(mask).save(tmp_path / "gt" / "a.png")
    common = ["--images", str(tmp_path / "img"), "--masks", str(tmp_path / "gt")]
    code = main(["train", "r2unet", *common, "--out", str(tmp_path / "m.safetensors"), "--widths", "4,8", "--epochs", "1",
                 "--steps-per-epoch", "1", "--patch-size", "32", "--val-fraction", "0"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if refusal is None:
        assert code == 0, err
    else:
        assert code == 1 and err.count("\n") == 1 and refusal in err, err
    code = main(["evaluate", str(tiny_checkpoint), *common])
    out, err = capsys.readouterr()
    if case in ("other-shape", "labels-0-1-2"):
        assert code == 1 and err.count("\n") == 1
    else:
        assert code == 0 and "pooled" in out
        if case.startswith("all-"):
            assert "undefined (nan)" in err


# -- properties ------------------------------------------------------------------------------------
DTYPES = [np.bool_, np.uint8, np.uint16, np.int16, np.int64, np.float16, np.float32, np.float64]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 70), w=st.integers(1, 70), channels=st.sampled_from([None, 1, 2, 3, 4]),
       dtype=st.sampled_from(DTYPES), tile=st.one_of(st.none(), st.integers(16, 96)), overlap=st.floats(0.0, 0.9),
       holes=st.sampled_from([0.0, 0.1, 0.9]), seed=st.integers(0, 2**16))
def test_any_image_gives_finite_probabilities_of_its_shape(segmenter, h, w, channels, dtype, tile, overlap, holes, seed):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    image = (rng.random(shape) * 300).astype(dtype)
    if holes and np.dtype(dtype).kind == "f":
        image[rng.random(shape) < holes] = rng.choice([np.nan, np.inf, -np.inf])
    try:
        probs = segmenter.predict(image, channel_axis=None if channels is None else -1, tile=tile, overlap=overlap)
    except R2UNetError as exc:  # the only acceptable refusal: nothing finite to normalise
        assert "finite" in str(exc)
        return
    assert probs.shape == (1, h, w) and np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 50), w=st.integers(1, 50), c=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       channels=st.sampled_from(["green", "gray", "rgb", "all"]), normalize=st.sampled_from(["percentile", "zscore", "range"]),
       scale=st.sampled_from([1e-6, 1.0, 1e4]), seed=st.integers(0, 2**16))
def test_preprocessing_is_finite_for_any_image(h, w, c, dtype, channels, normalize, scale, seed):
    image = (np.random.default_rng(seed).random((c, h, w)) * scale * 100).astype(dtype)
    config = PreprocessConfig(channels=channels, normalize=normalize)
    chw = to_chw(image, 0)
    try:
        stats = measure_stats(chw, config)
    except R2UNetError as exc:  # e.g. float16 values beyond 65504 became inf: a clear refusal
        assert "finite" in str(exc)
        return
    x = normalize_tile(chw, stats, config)
    assert x.shape == (config.out_channels(c), h, w) and x.dtype == np.float32 and np.isfinite(x).all()


# -- the checkpoint loader under fuzzing --------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    return random_checkpoint(tmp_path_factory.mktemp("fuzz") / "good.safetensors", widths=(4, 8)).read_bytes()


MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 10**9), st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("header"), st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                                              max_leaves=12)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
)


def _mutate(data: bytes, mutation: tuple) -> bytes:
    kind, arg = mutation
    buf = bytearray(data)
    if kind == "flip":
        for position, bit in arg:
            buf[position % len(buf)] ^= 1 << bit
    elif kind == "truncate":
        del buf[arg % len(buf):]
    elif kind == "insert":
        position, payload = arg
        buf[position % len(buf):position % len(buf)] = payload
    elif kind == "header":
        header = json.dumps(arg).encode()
        buf = bytearray(len(header).to_bytes(8, "little") + header + bytes(buf[8 + int.from_bytes(buf[:8], "little"):]))
    elif kind == "length":
        buf[:8] = arg.to_bytes(8, "little")
    return bytes(buf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_fuzzed_checkpoints_are_refused_cleanly(checkpoint_bytes, tmp_path, mutation):
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(_mutate(checkpoint_bytes, mutation))
    try:
        checkpoint = load_checkpoint(path)
    except R2UNetError as exc:
        assert "\n" not in str(exc)
        return
    # a mutation the loader accepts must still give a usable model (e.g. a flip inside provenance text)
    assert Segmenter(checkpoint, device="cpu").predict(np.ones((16, 16), np.uint8)).shape == (1, 16, 16)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_hostile_pickles_run_nothing(tmp_path, suffix):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, data in {"plain": pickle.dumps(Payload()), "zip": None}.items():
        path = tmp_path / f"{name}{suffix}"
        if data is None:
            import torch

            torch.save({"state_dict": Payload()}, path)  # the classic torch.load exploit
        else:
            path.write_bytes(data)
        with pytest.raises(R2UNetError):
            load_checkpoint(path)
    assert not marker.exists()


# -- kill -9 and resume ---------------------------------------------------------------------------
def _train_cmd(images: Path, masks: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "src_models.cli", "train", "r2unet", "--images", str(images), "--masks", str(masks),
            "--out", str(out), "--widths", "4,8", "--patch-size", "32", "--batch-size", "2", "--steps-per-epoch", "4",
            "--epochs", "40", "--val-fraction", "0", "--threads", "1", *extra]


def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(train_folders, tmp_path):
    import torch

    from src_models.training import history_path, resume_path

    images, masks = train_folders
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference.safetensors"
    subprocess.run(_train_cmd(images, masks, reference), check=True, capture_output=True, env=env, cwd=ROOT, timeout=600)

    out = tmp_path / "killed.safetensors"
    process = subprocess.Popen(_train_cmd(images, masks, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once two epochs are on disk, in the middle of the third
        try:
            if len(json.loads(history_path(out).read_text())) >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    # what the killed run left is complete: the best checkpoint, the resume state and the history
    assert load_checkpoint(out).config.arch == "r2unet"
    state = torch.load(resume_path(out), weights_only=True)["state"]
    assert 2 <= state["epoch"] < 40
    assert json.loads(history_path(out).read_text())

    subprocess.run(_train_cmd(images, masks, out, "--resume"), check=True, capture_output=True, env=env, cwd=ROOT, timeout=600)
    resumed, uninterrupted = load_checkpoint(out).state_dict, load_checkpoint(reference).state_dict
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_sigkill_during_prediction_keeps_the_previous_output(tmp_path, trained_checkpoint):
    image = vessel_image((768, 768), seed=3)[0]
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "src_models.cli", "predict", str(trained_checkpoint), str(tmp_path / "a.png"), "--out", str(out),
           "--save-prob", "--tile", "128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)  # fills the caches (graph export)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    run_s = time.perf_counter() - start  # how long the killed runs would take: the kills land inside them
    killed = 0
    for fraction in (0.25, 0.55, 0.9):  # at different moments: loading, predicting, writing
        process = subprocess.Popen([*cmd, "--threshold", "0.3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(fraction * run_s)
        process.send_signal(signal.SIGKILL)
        killed += process.wait(30) == -signal.SIGKILL
        for name, data in before.items():  # each file is the old one or a complete new one
            current = (out / name).read_bytes()
            assert current == data or tifffile.imread(out / name).shape[-2:] == (768, 768)
    assert killed >= 2  # not runs that had already finished (a slower machine only moves the moments)


# -- the widgets ----------------------------------------------------------------------------------
# napari itself refuses the first five as layers; the 300k one gets its own test (napari would scan it)
GUI_CASES = [k for k in IMAGES if k not in ("empty", "complex", "4d", "5d", "6-channel", "huge-300k")]


@pytest.fixture
def segment_widget(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    widget.add_model(str(random_checkpoint(tmp_path / "tiny.safetensors")))
    return widget


def _add(viewer, case: str):
    image = IMAGES[case][0]
    rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
    return viewer.add_image(image, name=case, rgb=rgb) if rgb else viewer.add_image(image, name=case, channel_axis=None)


@pytest.mark.gui
@pytest.mark.parametrize("case", GUI_CASES, ids=GUI_CASES)
def test_segment_widget_bad_input_matrix(segment_widget, qtbot, case):
    viewer = segment_widget.viewer
    _add(viewer, case)
    segment_widget.image_combo.setCurrentText(case)
    before = len(viewer.layers)
    segment_widget.start()
    qtbot.waitUntil(lambda: not segment_widget.running, timeout=60_000)
    status = segment_widget.status.text()
    assert "internal error" not in status and "Traceback" not in status
    refusal = IMAGES[case][1]
    if refusal is None:
        assert len(viewer.layers) > before, status
    else:
        assert refusal in status and len(viewer.layers) == before, status


@pytest.mark.gui
def test_a_failed_run_adds_no_half_filled_layer(segment_widget, qtbot, monkeypatch):
    viewer = segment_widget.viewer
    _add(viewer, "float64")
    segment_widget.image_combo.setCurrentText("float64")

    def fail_midway(cache, spec, device, job, progress, should_stop, log):
        progress(0.5)
        raise R2UNetError("the disk went away halfway")

    monkeypatch.setattr("napari_r2unet._segment_widget.segment", fail_midway)
    before = [layer.name for layer in viewer.layers]
    segment_widget.start()
    qtbot.waitUntil(lambda: not segment_widget.running, timeout=10_000)
    assert [layer.name for layer in viewer.layers] == before and "halfway" in segment_widget.status.text()


@pytest.mark.gui
def test_two_viewers_share_no_mutable_state(make_napari_viewer, tmp_path, qtbot):
    first, second = make_napari_viewer(), make_napari_viewer()
    _, a = first.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    _, b = second.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    _, fa = first.window.add_plugin_dock_widget("napari-r2unet", "Fine-tune")
    _, fb = second.window.add_plugin_dock_widget("napari-r2unet", "Fine-tune")
    assert a._cache is not b._cache and a._stop is not b._stop and fa._stop is not fb._stop
    a.add_model(str(random_checkpoint(tmp_path / "only-in-a.safetensors")))
    assert b.model_combo.findText("only-in-a.safetensors") < 0
    first.add_image(np.ones((32, 32), np.uint8), name="x")
    assert a.image_combo.findText("x") >= 0 and b.image_combo.findText("x") < 0
    a.image_combo.setCurrentText("x")
    a.start()
    assert a.running and not b.running and not fb.running
    qtbot.waitUntil(lambda: not a.running, timeout=60_000)


@pytest.mark.gui
@pytest.mark.parametrize(("labels", "message"), [
    (np.zeros((64, 64), np.int64), "nothing to learn"),  # all background, other dtype
    (np.full((64, 64), 1, np.int8), None),  # all foreground, int8
    ((vessel_image((64, 64), seed=2)[1]).astype(np.uint32), None),
    (np.full((64, 64), 3, np.int8), "repaint those pixels with label 1"),  # a binary model takes labels 0 and 1 only
    ((vessel_image((64, 64), seed=2)[1] * 9).astype(np.uint32), "holds label(s) 9"),
])
def test_finetune_widget_labels_of_other_dtypes_and_content(make_napari_viewer, trained_checkpoint, qtbot, labels, message):
    viewer = make_napari_viewer()
    viewer.add_image(vessel_image((64, 64), seed=2)[0], name="img")
    viewer.add_labels(labels, name="hand")
    fine = docked_finetune(viewer, str(trained_checkpoint), "hand")
    fine.epochs_spin.setValue(1)
    fine.steps_spin.setValue(2)
    fine.patch_spin.setValue(32)
    fine.start()
    qtbot.waitUntil(lambda: not fine.running, timeout=60_000)
    status = fine.status.text()
    assert "internal error" not in status
    if message is None:
        assert "new version" in status, status
    else:
        assert message in status


@pytest.mark.gui
def test_segment_widget_refuses_a_30k_image_that_would_not_fit(segment_widget, qtbot, monkeypatch):
    da = pytest.importorskip("dask.array")
    viewer = segment_widget.viewer
    viewer.add_image(da.zeros((30_000, 30_000), dtype=np.uint8, chunks=4096), name="slide", contrast_limits=(0, 255))
    segment_widget.image_combo.setCurrentText("slide")
    monkeypatch.setattr("src_models.resources.available_memory", lambda: 4 * 1024**3)
    before = len(viewer.layers)
    segment_widget.start()
    assert not segment_widget.running and len(viewer.layers) == before
    assert "GiB of memory" in segment_widget.status.text() and "only 4.0 GiB is free" in segment_widget.status.text()


@pytest.mark.gui
def test_closing_the_viewer_stops_a_running_segmentation(make_napari_viewer, tmp_path, qtbot, monkeypatch):
    import threading

    viewer = make_napari_viewer()
    viewer.add_image(np.ones((32, 32), np.uint8), name="x")
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    widget.image_combo.setCurrentText("x")
    started, ended = threading.Event(), threading.Event()

    def slow_segment(cache, spec, device, job, progress, should_stop, log):
        from src_models.errors import CancelledError

        started.set()
        try:
            for _ in range(1200):  # a minute unless stopped
                if should_stop():
                    raise CancelledError()
                time.sleep(0.05)
        finally:
            ended.set()

    monkeypatch.setattr("napari_r2unet._segment_widget.segment", slow_segment)
    widget.start()
    assert started.wait(10)
    inserted = []
    viewer.layers.events.inserted.connect(lambda event: inserted.append(event.value.name))
    viewer.close()
    qtbot.waitUntil(ended.is_set, timeout=10_000)
    qtbot.wait(200)
    assert inserted == []  # nothing half-made was added
