"""The napari plugin: manifest, lazy torch, sample data, writer/reader and the Segment widget (under Xvfb)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import random_checkpoint, run_to_end

from src_models.openvino_backend import openvino_available
from src_models.precision import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = yaml.safe_load((ROOT / "napari.yaml").read_text())


def test_manifest_is_valid_and_shipped_inside_the_package():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-r2unet")
    assert manifest.name == "napari-r2unet" and {"Segmentation", "Annotation"} <= set(manifest.categories)
    import napari_r2unet

    inside = Path(napari_r2unet.__file__).parent / "napari.yaml"
    assert inside.read_text() == (ROOT / "napari.yaml").read_text()
    assert "napari/layers/segment" in MANIFEST["contributions"]["menus"]


@pytest.mark.parametrize("command", MANIFEST["contributions"]["commands"], ids=lambda c: c["id"])
def test_every_python_name_imports(command):
    module, _, name = command["python_name"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_napari_start_up_does_not_import_torch():
    probe = (
        "import sys, napari_r2unet, napari_r2unet._segment_widget, napari_r2unet._finetune_widget, napari_r2unet._sample_data, "
        "napari_r2unet._io, napari_r2unet._menus; from npe2 import PluginManager; pm = PluginManager.instance(); pm.discover(); "
        "from napari_r2unet._models import builtin_choices; builtin_choices(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_synthetic_sample_files_match_their_generator():
    from napari_r2unet._sample_data import make_synthetic, synthetic_vessels

    image, truth = make_synthetic()
    (img, _, kind_img), (lab, _, kind_lab) = synthetic_vessels()
    assert kind_img == "image" and kind_lab == "labels"
    assert np.array_equal(img, image) and np.array_equal(lab, truth)


def test_writer_and_reader(tmp_path):
    import tifffile

    from napari_r2unet._io import get_checkpoint_reader, write_labels
    from src_models.label_files import label_file_header

    labels = np.zeros((5, 6), np.int64)
    labels[1, 2] = 3
    assert write_labels(str(tmp_path / "l.tif"), labels, {}) == [str(tmp_path / "l.tif")]
    assert np.array_equal(tifffile.imread(tmp_path / "l.tif"), labels)  # classes stored as they are
    assert label_file_header(tmp_path / "l.tif")["binary"] is False
    ckpt = random_checkpoint(tmp_path / "m.safetensors")
    assert callable(get_checkpoint_reader(str(ckpt)))
    assert get_checkpoint_reader(str(tmp_path / "l.tif")) is None


@pytest.mark.gui
def test_saved_labels_open_again_as_labels_with_their_provenance(make_napari_viewer, tmp_path):
    import tifffile
    from napari.layers import Image, Labels

    from napari_r2unet._io import get_label_reader, read_labels, reader_plugin
    from src_models.label_files import label_file_header

    viewer = make_napari_viewer()
    mask = np.zeros((2, 3, 8, 9), np.uint8)  # a time series of stacks
    mask[1, 2, 2:5, 3:7] = 1
    probs = np.full((1, 8, 9), 0.7, np.float16)
    meta = {"model": "tiny", "spec": "/m/tiny.safetensors", "image": "vessels", "threshold": 0.35, "probabilities": probs, "prediction": mask}
    layer = viewer.add_labels(mask, name="vessels [tiny]", metadata={"r2unet": meta})
    path = tmp_path / "saved.tif"
    layer.save(str(path), plugin="napari-r2unet")  # File > Save Selected Layers, our writer
    assert set(np.unique(tifffile.imread(path))) == {0, 255}  # visible in other viewers
    [opened] = viewer.open(str(path), plugin="napari-r2unet")
    assert isinstance(opened, Labels) and opened.name == "saved"
    assert opened.data.shape == mask.shape and np.array_equal(opened.data, mask)  # 0/1 again
    header = opened.metadata["r2unet_file"]
    assert (header["model"], header["spec"], header["image"], header["threshold"]) == ("tiny", "/m/tiny.safetensors", "vessels", 0.35)
    assert header["layer"] == "vessels [tiny]" and "probabilities" not in header and "prediction" not in header
    assert reader_plugin(str(path)) == "napari-r2unet"

    opened.save(str(tmp_path / "again.tif"), plugin="napari-r2unet")  # saved again: the provenance carries over
    assert get_label_reader(str(tmp_path / "again.tif")) is read_labels
    again = label_file_header(tmp_path / "again.tif")
    assert (again["model"], again["spec"], again["threshold"]) == ("tiny", "/m/tiny.safetensors", 0.35)

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert get_label_reader(str(plain)) not in (None, read_labels)  # not ours: napari's builtin reader reads it
    [image] = viewer.open(str(plain), plugin="napari-r2unet")  # even when "remember" chose our reader for .tif
    assert isinstance(image, Image) and reader_plugin(str(plain)) == "napari"
    assert get_label_reader(str(tmp_path / "a.png")) is None and get_label_reader([str(path)]) is None


def test_result_layer_names_carry_a_short_model_tag():
    from napari_r2unet._layers import MAX_TAG, model_tag, result_name

    assert result_name("retina", "r2unet-drive") == "retina [r2unet-drive]"
    assert result_name("retina", "r2unet-drive ft 12-02 21:05, 3 images, val Dice 0.812") == "retina [r2unet-drive ft 12-02 21:05]"
    assert result_name("retina", "r2unet-drive ft 12-02 21:05, 3 images (2)", "probability") == "retina probability [r2unet-d\u2026 ft 12-02 21:05 (2)]"
    long_base = model_tag("r2unet-drive-camera-robust ft 12-02 21:05, 1 image")
    assert long_base == "r2unet-drive\u2026 ft 12-02 21:05" and len(long_base) == MAX_TAG
    named = model_tag("my very own model name after Monday's corrections")
    assert len(named) == MAX_TAG and named.startswith("my very own model") and named.endswith("\u2026")
    assert model_tag("vessels v2") == "vessels v2"


def test_the_reader_refuses_other_safetensors_files_with_one_line(tmp_path, monkeypatch):
    from napari_r2unet._io import get_checkpoint_reader

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    (tmp_path / "zeros.safetensors").write_bytes(b"\x00" * 32)
    header = b'{"__metadata__": {"format": "pt"}}'
    (tmp_path / "hf.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    for name in ("zeros.safetensors", "hf.safetensors"):
        assert get_checkpoint_reader(str(tmp_path / name))(str(tmp_path / name)) == [(None,)]  # claimed: no layer
    assert shown[0].startswith("zeros.safetensors is not a checkpoint (.safetensors) file; ")
    assert shown[1].startswith("hf.safetensors is not a napari-r2unet checkpoint: ") and "format 'pt'" in shown[1]
    assert len(shown) == 2 and not any(str(tmp_path) in line or "\n" in line for line in shown)  # one line, the file's name only


@pytest.mark.gui
def test_a_text_file_named_safetensors_dropped_on_the_canvas_gets_our_message(make_napari_viewer, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not a model\n" * 20)
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    assert viewer.open(str(text), plugin="napari-r2unet") == []  # napari's open path: no ReaderPluginError
    assert viewer.open(str(text), plugin=None) == [] and len(viewer.layers) == 0  # as a drop: the one compatible reader
    assert shown and all(line.startswith("notes.safetensors is not a checkpoint (.safetensors) file; ") for line in shown)


# -- GUI --------------------------------------------------------------------------------------
@pytest.fixture
def widget(make_napari_viewer, tmp_path, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-r2unet", "synthetic_vessels")
    viewer.layers["synthetic vessels"].scale = (2.0, 3.0)
    _, w = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    w.add_model(str(random_checkpoint(tmp_path / "tiny.safetensors", widths=(4, 8, 16))))
    w.image_combo.setCurrentText("synthetic vessels")
    return w


@pytest.mark.gui
def test_segmenting_the_sample_gives_a_labels_layer(widget, qtbot):
    from napari.layers import Labels

    viewer = widget.viewer
    run_to_end(widget, qtbot)
    layer = viewer.layers["synthetic vessels [tiny]"]
    assert isinstance(layer, Labels)
    assert layer.data.shape == (256, 256) and layer.data.dtype == np.uint8
    assert tuple(layer.scale) == (2.0, 3.0)
    assert "synthetic vessels probability [tiny]" in viewer.layers
    assert "tiny" in widget.status.text() or "done" in widget.status.text()


@pytest.mark.gui
def test_the_scale_setting_reaches_the_segmenter_and_a_bad_one_is_refused(widget, qtbot, monkeypatch):
    from napari_r2unet import _worker

    seen = []

    original = _worker.SegmenterCache.get

    def spy(self, spec, device, log, tta=False, scale="auto", **options):
        seen.append(scale)
        return original(self, spec, device, log, tta=tta, scale=scale, **options)

    monkeypatch.setattr(_worker.SegmenterCache, "get", spy)
    assert widget.scale_combo.currentText() == "auto"
    widget.scale_combo.setCurrentText("0.5")
    run_to_end(widget, qtbot)
    assert seen == ["0.5"] and widget.viewer.layers["synthetic vessels [tiny]"].data.shape == (256, 256)
    widget.scale_combo.setCurrentText("huge")
    widget.start()
    assert "must be 'auto' or a factor" in widget.status.text() and not widget.running and seen == ["0.5"]


def _loads_with_warm_up(monkeypatch) -> list:
    """The Segmenters the widget's cache hands out, in order, with the warm-up on."""
    from napari_r2unet import _worker

    loaded = []
    original = _worker.SegmenterCache.get

    def spy(self, *args, **options):
        loaded.append(original(self, *args, **options))
        return loaded[-1]

    monkeypatch.setattr(_worker.SegmenterCache, "get", spy)
    monkeypatch.setenv("R2UNET_WARMUP", "1")
    return loaded


@pytest.mark.gui
def test_choosing_a_model_warms_it_up_and_segment_takes_the_warm_one(widget, qtbot, monkeypatch, tmp_path):
    loaded = _loads_with_warm_up(monkeypatch)
    widget.precision_combo.setCurrentText("fp32")
    widget.add_model(str(random_checkpoint(tmp_path / "other.safetensors", widths=(4, 8, 16), seed=1)))  # chosen: warms up
    qtbot.waitUntil(lambda: len(loaded) == 1 and not widget._warming, timeout=30_000)
    assert loaded[0].checkpoint.name == "other" and loaded[0].precision == "fp32"
    run_to_end(widget, qtbot)
    assert len(loaded) == 2 and loaded[1] is loaded[0]  # the Segment press reused the warm model
    assert "synthetic vessels [other]" in widget.viewer.layers
    # a Segment pressed at once, while the warm-up of another model still runs, waits and shares it
    widget.add_model(str(random_checkpoint(tmp_path / "third.safetensors", widths=(4, 8, 16), seed=2)))
    widget.start()
    assert widget._warming and "starts when it is ready" in widget.status.text()
    qtbot.waitUntil(lambda: not widget._warming and not widget.running and "synthetic vessels [third]" in widget.viewer.layers,
                    timeout=60_000)
    assert len(loaded) == 4 and loaded[2] is loaded[3] and loaded[3].checkpoint.name == "third"
    assert loaded[3].backend == "onnxruntime"  # no run saw a half-built session and fell back to PyTorch
    assert "synthetic vessels [third]" in widget.viewer.layers


@pytest.mark.gui
@pytest.mark.skipif(not (openvino_available() and cpu_has_native_bf16()), reason="OpenVINO's bf16 needs openvino and AMX / AVX-512 BF16")
def test_bf16_in_the_widget_warms_up_and_segments_on_openvino(widget, qtbot, monkeypatch, tmp_path):
    loaded = _loads_with_warm_up(monkeypatch)
    widget.precision_combo.setCurrentText("bf16")
    widget.add_model(str(random_checkpoint(tmp_path / "bf.safetensors", widths=(4, 8, 16), seed=1)))  # chosen: warms up
    qtbot.waitUntil(lambda: len(loaded) == 1 and not widget._warming, timeout=30_000)
    assert (loaded[0].backend, loaded[0].precision) == ("openvino", "bf16")
    run_to_end(widget, qtbot)
    assert loaded[-1] is loaded[0] and loaded[0].backend == "openvino"  # no fall-back on the way
    assert "synthetic vessels [bf]" in widget.viewer.layers


@pytest.mark.gui
def test_cancel_stops_the_worker_and_adds_nothing(widget, qtbot, monkeypatch):
    started = []

    def slow_segment(cache, spec, device, job, progress, should_stop, log):
        import time

        from src_models.errors import CancelledError

        started.append(1)
        for _ in range(200):  # like the tiler: checks between tiles
            if should_stop():
                raise CancelledError()
            time.sleep(0.05)
        raise AssertionError("not cancelled")

    monkeypatch.setattr("napari_r2unet._segment_widget.segment", slow_segment)
    before = len(widget.viewer.layers)
    widget.start()
    qtbot.waitUntil(lambda: bool(started), timeout=10_000)
    widget.start()  # a second request while one runs is refused, not queued on top
    assert widget.busy_message in widget.status.text()
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=5_000)
    assert len(widget.viewer.layers) == before and "cancelled" in widget.status.text() and started == [1]


@pytest.mark.gui
def test_rethreshold_without_running_the_network_again(widget, qtbot, monkeypatch):
    run_to_end(widget, qtbot)
    layer = widget.viewer.layers["synthetic vessels [tiny]"]
    widget.viewer.layers.selection.active = layer
    calls = []
    monkeypatch.setattr("napari_r2unet._segment_widget.segment", lambda *a, **k: calls.append(1))
    before = layer.data.copy()
    probs = layer.metadata["r2unet"]["probabilities"][0].astype(np.float32)
    widget.threshold_slider.setValue(int(round(np.median(probs) * 100)))
    assert not calls and not np.array_equal(layer.data, before)
    assert np.array_equal(layer.data, (probs >= widget.threshold).astype(np.uint8))


@pytest.mark.gui
def test_painted_pixels_survive_a_second_segmentation(widget, qtbot):
    widget.threshold_slider.setValue(1)  # a random model: keep plenty of foreground to erase and refill
    run_to_end(widget, qtbot)
    layer = widget.viewer.layers["synthetic vessels [tiny]"]
    painted = np.zeros(layer.data.shape, bool)
    painted[10:40, 10:40] = True
    layer.data_setitem(np.nonzero(painted), 7)  # the user's brush
    erased = layer.data == 1
    erased[:, :128] = False
    layer.data_setitem(np.nonzero(erased), 0)  # ... and eraser: these may be filled again (they are 0)
    snapshot = layer.data.copy()
    widget._refresh_layers()
    widget.target_combo.setCurrentText(f"fill {layer.name}")
    run_to_end(widget, qtbot)
    assert "filled" in widget.status.text() and not np.array_equal(layer.data, snapshot)
    assert (layer.data[painted] == 7).all()
    kept = snapshot != 0
    assert np.array_equal(layer.data[kept], snapshot[kept])
    layer.undo()
    assert np.array_equal(layer.data, snapshot)


@pytest.mark.gui
def test_errors_become_notifications_not_tracebacks(widget, qtbot, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    widget._guard(lambda: widget.add_model(str(broken)))
    assert "is not a checkpoint (.safetensors) file" in widget.status.text()  # issue 12: 64 zero bytes are no checkpoint
    widget.image_combo.clear()
    widget.start()
    assert "open an image first" in widget.status.text() and not widget.running


@pytest.mark.gui
def test_window_screenshot_has_content(widget, qtbot):
    run_to_end(widget, qtbot)
    shot = widget.viewer.screenshot(canvas_only=False, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 200 and shot[..., :3].std() > 10
    canvas = widget.viewer.screenshot(canvas_only=True, flash=False)
    assert len(np.unique(canvas[..., 0])) > 20


@pytest.mark.gui
def test_stacks_current_slice_and_all_slices(widget, qtbot):
    viewer = widget.viewer
    stack = np.stack([viewer.layers["synthetic vessels"].data[..., 1][:96, :80]] * 3)
    viewer.add_image(stack, name="stack", scale=(5.0, 1.0, 1.0))
    widget.image_combo.setCurrentText("stack")
    widget.threshold_slider.setValue(1)  # the random model's p is about 0.44: every segmented pixel is foreground
    viewer.dims.set_current_step(0, 1)
    run_to_end(widget, qtbot)
    layer = viewer.layers["stack [tiny]"]
    assert layer.data.shape == (3, 96, 80) and tuple(layer.scale) == (5.0, 1.0, 1.0)
    assert layer.data[1].all() and layer.data[0].max() == 0 and layer.data[2].max() == 0  # only the current slice
    widget.all_slices.setChecked(True)
    run_to_end(widget, qtbot)
    every = viewer.layers["stack [tiny] [1]"]
    assert every.data.shape == (3, 96, 80) and every.data.all()  # every slice


@pytest.mark.gui
def test_dask_backed_layers(widget, qtbot):
    da = pytest.importorskip("dask.array")
    viewer = widget.viewer
    image = viewer.layers["synthetic vessels"].data
    viewer.add_image(da.from_array(image, chunks=(64, 64, 3)), name="lazy", rgb=True)
    widget.image_combo.setCurrentText("lazy")
    run_to_end(widget, qtbot)
    assert viewer.layers["lazy [tiny]"].data.shape == (256, 256)


@pytest.mark.gui
def test_layers_menu_and_dropped_checkpoint(make_napari_viewer, tmp_path, monkeypatch):
    from napari._app_model import get_app_model

    from napari_r2unet._io import get_checkpoint_reader

    viewer = make_napari_viewer()
    viewer.open_sample("napari-r2unet", "retina")
    app = get_app_model()  # napari's own dispatch: arguments are injected by their type annotation
    assert "napari-r2unet.segment_selected" in [item.command.id for item in app.menus.get_menu("napari/layers/segment")
                                                 if hasattr(item, "command")]
    app.commands.execute_command("napari-r2unet.segment_selected").result()
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")  # the one the menu docked
    assert widget.image_combo.currentText() == "retina"
    assert len([name for name in viewer.window.dock_widgets if "Segment" in name]) == 1
    monkeypatch.setattr("napari.current_viewer", lambda: viewer)
    ckpt = random_checkpoint(tmp_path / "dropped.safetensors")
    assert get_checkpoint_reader(str(ckpt))(str(ckpt)) == [(None,)]
    assert widget.model_combo.currentText() == "dropped.safetensors"


@pytest.mark.gui
def test_threshold_follows_the_result_layer_not_the_selection(widget, qtbot):
    from napari_r2unet._layers import add_result_layers, plan_job

    run_to_end(widget, qtbot)
    viewer = widget.viewer
    image, layer = viewer.layers["synthetic vessels"], viewer.layers["synthetic vessels [tiny]"]
    viewer.layers.selection.active = image  # the image selected, as in the bug report
    assert widget.result_combo.currentText() == layer.name and layer.name in widget.threshold_slider.toolTip()
    probs = layer.metadata["r2unet"]["probabilities"][0].astype(np.float32)
    value = int(round(np.median(probs) * 100))
    widget.threshold_slider.setValue(value)
    assert np.array_equal(layer.data, (probs >= value / 100).astype(np.uint8))
    assert layer.metadata["r2unet"]["threshold"] == value / 100 and layer.name in widget.status.text()
    other = add_result_layers(viewer, image, plan_job(image, (), False), probs[None], 0.3, "other", False)
    assert widget.result_combo.currentText() == other.name and widget.threshold_label.text() == "0.30"  # the latest result
    viewer.layers.selection.active = layer  # choosing a result in the layer list chooses it here
    assert widget.result_combo.currentText() == layer.name and widget.threshold_slider.value() == value
    for name in (layer.name, other.name):
        viewer.layers.remove(name)
    widget.threshold_slider.setValue(40)
    assert not widget.result_combo.isEnabled() and "next segmentation" in widget.status.text()
    assert "next segmentation" in widget.threshold_slider.toolTip()


@pytest.mark.gui
def test_tiling_bounds_defaults_and_tooltips_come_from_the_settings(widget):
    from src_models import settings

    assert widget.overlap_spin.maximum() == settings.MAX_OVERLAP and widget.overlap is None
    assert f"auto = {settings.AUTO_OVERLAP_PIXELS} pixels" in widget.overlap_spin.toolTip()
    assert f"else {settings.AUTO_TILE}" in widget.tile_spin.toolTip() and widget.tile is None
    assert widget.threshold == settings.DEFAULT_THRESHOLD
    widget.overlap_spin.setValue(settings.MAX_OVERLAP)
    widget.tile_spin.setValue(settings.MIN_USER_TILE)
    assert widget.overlap == settings.MAX_OVERLAP and widget.tile == settings.MIN_USER_TILE


def test_the_plugin_uses_no_private_napari_window_api():
    for path in sorted((ROOT / "napari_r2unet").glob("*.py")):
        nodes = list(ast.walk(ast.parse(path.read_text())))
        names = {n.attr for n in nodes if isinstance(n, ast.Attribute)} | {n.value for n in nodes if isinstance(n, ast.Constant)}
        assert not names & {"_qt_window", "_qt_viewer", "_dock_widgets"}, path.name


@pytest.mark.gui
def test_a_floating_dock_still_finds_the_main_window(widget):
    from qtpy.QtWidgets import QMainWindow

    docked = widget._main_window()
    widget.parentWidget().setFloating(True)
    assert isinstance(docked, QMainWindow) and widget._main_window() is docked and widget.window() is not docked


@pytest.mark.slow
def test_wheel_ships_the_manifest_and_the_samples(tmp_path):
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("napari_r2unet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("napari_r2unet/napari.yaml", "napari_r2unet/sample_data/synthetic_vessels.png", "src_models/cli.py"):
        assert needed in names, needed
    assert zipfile.ZipFile(wheel).read("napari_r2unet/napari.yaml").decode() == (ROOT / "napari.yaml").read_text()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "napari-r2unet = napari_r2unet:napari.yaml" in zipfile.ZipFile(wheel).read(entry_points).decode()
