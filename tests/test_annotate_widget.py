"""The Annotate folder widget under Xvfb: Next, edits autosaved, kill -9, resume, Retrain now."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import image_folder

from src_models.annotation import CORRECTED, LOCK_FILE, PREDICTED
from src_models.label_files import read_label_file

pytestmark = pytest.mark.gui
HERE = Path(__file__).resolve().parent


def docked(viewer, checkpoint):
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Annotate folder")
    widget.model_combo.add_file(str(checkpoint))
    return widget


def test_next_opens_the_most_uncertain_edits_are_saved_and_undo_works(make_napari_viewer, qtbot, tmp_path, trained_checkpoint):
    images, _ = image_folder(tmp_path, count=4, size=96)
    viewer = make_napari_viewer(show=True)
    widget = docked(viewer, trained_checkpoint)
    with pytest.raises(Exception, match="choose the folder of images first"):
        widget.open_folder()
    session = widget.open_folder(str(images))
    qtbot.waitUntil(lambda: not widget.predicting, timeout=60_000)
    assert all(e.status == PREDICTED for e in session.entries.values())
    assert widget.table.rowCount() == 4 and widget.table.status_of("im0") == "predicted"
    most = max(session.entries.values(), key=lambda e: e.uncertainty).id
    assert widget.next_image() == most
    names = [layer.name for layer in viewer.layers]
    assert names == [most, f"{most} labels"]  # one image on the canvas at a time, short names
    layer = widget._labels_layer
    predicted = np.array(layer.data)
    widget.autosave()
    assert not session.correction_path(most).exists()  # nothing edited: no correction
    layer.data_setitem((np.arange(10), np.arange(10)), np.ones(10, np.uint8) - predicted[np.arange(10), np.arange(10)])
    widget.autosave()
    saved, header = read_label_file(session.correction_path(most))
    assert np.array_equal(saved, layer.data) and session.entries[most].status == CORRECTED and header["image"] == f"{most}.png"
    layer.undo()  # napari's own undo
    assert np.array_equal(layer.data, predicted)
    second = widget.next_image()
    assert second is not None and second != most and session.entries[most].status == CORRECTED
    assert [layer.name for layer in viewer.layers] == [second, f"{second} labels"]  # the first image's layers went
    assert np.array_equal(read_label_file(session.correction_path(most))[0], predicted)  # the undone state was saved on Next
    assert widget.mark_done() not in (most, second, None)
    assert session.entries[second].status == "done"  # an unchanged prediction, accepted as it is
    # a second window on the same folder is refused with who holds it
    other = docked(make_napari_viewer(), trained_checkpoint)
    other.images_edit.setText(str(images))
    other.open_button.click()
    assert "is open in another napari" in other.status.text()
    widget.close_session()
    assert not (session.labels_dir / LOCK_FILE).exists()


def test_kill_9_then_reopen_restores_the_edits_and_retrain_now_repredicts_the_rest(make_napari_viewer, qtbot, tmp_path, trained_checkpoint):
    images, _ = image_folder(tmp_path, count=3, size=96)
    report = tmp_path / "child.json"
    child = subprocess.Popen([sys.executable, str(HERE / "annotate_child.py"), str(images), str(trained_checkpoint), str(report)],
                             env={**os.environ, "PYTHONPATH": str(HERE.parent)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not report.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not report.exists():
        child.kill()
        pytest.fail(f"the napari child did not report: {child.communicate()[0].decode()[-3000:]}")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    image_id = json.loads(report.read_text())["image"]
    edited = np.load(report.with_suffix(".npy"))
    labels_dir = images / "labels"
    assert (labels_dir / LOCK_FILE).exists()  # left behind by the killed process

    viewer = make_napari_viewer(show=True)
    widget = docked(viewer, trained_checkpoint)
    session = widget.open_folder(str(images))  # the stale lock is taken over
    assert widget.current == image_id and session.entries[image_id].status == CORRECTED
    assert np.array_equal(widget._labels_layer.data, edited)  # at most the autosave interval is lost: here nothing
    correction = session.correction_path(image_id).read_bytes()
    rest = [i for i in session.entries if i != image_id]
    before = {i: session.prediction(i)[0] for i in rest}
    widget.minutes_spin.setValue(0.1)
    widget.validate_check.setChecked(False)
    qtbot.waitUntil(lambda: not widget.predicting, timeout=60_000)
    widget.start()
    widget.open_button.click()  # another folder while retraining: refused, this one stays open
    assert "retraining is running" in widget.status.text() and widget.session is session
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert session.model.endswith(".safetensors") and session.model != str(trained_checkpoint), widget.status.text()
    qtbot.waitUntil(lambda: not widget.predicting, timeout=60_000)
    assert all(session.entries[i].model == session.model and session.entries[i].status == PREDICTED for i in rest)
    assert any(not np.array_equal(session.prediction(i)[0], before[i]) for i in rest)
    assert session.correction_path(image_id).read_bytes() == correction  # corrections are never replaced
    assert session.entries[image_id].model == str(trained_checkpoint)
    widget.close_session()


def test_a_new_prediction_goes_through_undo_and_keeps_painted_pixels(make_napari_viewer, qtbot, tmp_path, trained_checkpoint):
    images, _ = image_folder(tmp_path, count=2, size=96)
    widget = docked(make_napari_viewer(show=True), trained_checkpoint)
    session = widget.open_folder(str(images))
    qtbot.waitUntil(lambda: not widget.predicting, timeout=60_000)
    widget.table.cellDoubleClicked.emit(1, 0)  # double-click opens that row's image
    assert widget.current == "im1"
    layer = widget._labels_layer
    y, x = np.argwhere(np.asarray(layer.data) == 0)[0]
    layer.data_setitem((np.array([y]), np.array([x])), np.array([1], np.uint8))  # a brush stroke where the old prediction had none
    painted = np.array(layer.data)
    probs = np.full((1, 96, 96), 0.1, np.float32)  # a new model says: nothing is vessel
    session.save_prediction("im1", probs, np.zeros((96, 96), np.uint8), model="new")
    widget._on_predicted("im1")
    assert layer.data[y, x] == 1 and np.count_nonzero(layer.data) == 1  # the painted pixel kept, the rest replaced
    # still unsaved, so saved: taking the merged layer for the saved state lost strokes painted before a prediction arrived
    assert widget.save_current() and read_label_file(session.correction_path("im1"))[0][y, x] == 1
    layer.undo()
    assert np.array_equal(layer.data, painted)  # the replacement was one undoable step
    widget.close_session()


def test_a_full_disk_keeps_the_edits_open_and_says_so_once(make_napari_viewer, qtbot, tmp_path, trained_checkpoint, monkeypatch):
    from src_models import label_files
    from src_models.errors import R2UNetError

    images, _ = image_folder(tmp_path, count=2, size=96)
    widget = docked(make_napari_viewer(show=True), trained_checkpoint)
    session = widget.open_folder(str(images))
    qtbot.waitUntil(lambda: not widget.predicting, timeout=60_000)
    first = widget.next_image()
    layer = widget._labels_layer
    layer.data_setitem((np.arange(5), np.arange(5)), np.full(5, 1, np.uint8) - np.asarray(layer.data)[np.arange(5), np.arange(5)])
    edited = np.array(layer.data)
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)

    def full(*args, **kwargs):
        raise R2UNetError("cannot write in the labels folder: No space left on device; check the folder's space and permissions")

    original = label_files.atomic_write
    monkeypatch.setattr(label_files, "atomic_write", full)
    widget.autosave()
    widget.autosave()
    assert len(shown) == 1 and "No space left on device" in shown[0] and "nothing was lost" in shown[0]
    widget.next_button.click()  # refused: the image with unsaved edits stays open
    assert widget.current == first and np.array_equal(widget._labels_layer.data, edited)
    monkeypatch.setattr(label_files, "atomic_write", original)  # space again
    widget.autosave()
    assert np.array_equal(read_label_file(session.correction_path(first))[0], edited)
    widget.close_session()
