"""The benchmark suite runs (tiny sizes): `make bench` cannot rot unnoticed. Speed is judged by the
benchmark's ratios, never here. The result benchmarks' helpers (DRIVE transforms, sections of
docs/RESULTS.md) are checked on synthetic arrays and files."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str, monkeypatch: pytest.MonkeyPatch):
    """Import ``benchmarks/NAME.py`` as its scripts run: with the benchmarks folder on sys.path."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module(name)


@pytest.mark.slow
def test_bench_smoke_prints_every_ratio():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--threads", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for marker in ("sgemm:", "(a) predict", "x the roofline", "(b) eager PyTorch forward", "(c) predict 1024^2", "peak RSS", "(d) training"):
        assert marker in result.stdout, (marker, result.stdout[-2000:])


def test_task_results_replaces_only_its_own_section(tmp_path, monkeypatch):
    module = _benchmark("task_results", monkeypatch)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results on DRIVE\n\n| a |\n\n## Fine-tuning on a new kind of image\n\ntext\n")
    module.write_section(module.HEADING, ["first"], results)
    module.write_section(module.HEADING, ["second", "", "### sub", "rows"], results)
    text = results.read_text()
    assert text.count(module.HEADING) == 1 and "first" not in text and "### sub\nrows" in text
    assert text.startswith("# Results on DRIVE") and "## Fine-tuning on a new kind of image\n\ntext\n" in text
    results.write_text(text + "\n## Later section\n\nkept\n")
    module.write_section(module.HEADING, ["third"], results)
    assert "## Later section\n\nkept" in results.read_text() and "second" not in results.read_text()


def test_task_install_sets_the_card_tta_and_keeps_the_parent_command(tmp_path, monkeypatch):
    from src_models.checkpoint import load_checkpoint, save_checkpoint
    from src_models.nets import ModelConfig, build_model
    from src_models.preprocessing import PreprocessConfig

    module = _benchmark("task_results", monkeypatch)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    weights, runs = tmp_path / "src_models" / "weights", tmp_path / "runs"
    weights.mkdir(parents=True)
    runs.mkdir()
    config = ModelConfig(arch="unet", in_channels=3, widths=(4, 8))
    state = build_model(config).state_dict()

    def save(path, provenance):
        save_checkpoint(path, state, config, PreprocessConfig(channels="rgb"), ["lesion"], provenance)
        return load_checkpoint(path)

    shipped = save(weights / "unet-skin.safetensors", {"command": "r2unet train unet --epochs 6", "wall_time_s": 600})
    run = runs / "unet-skin.safetensors"
    save(run, {"command": "r2unet train unet --init unet-skin", "parent": "unet-skin", "parent_sha256": shipped.sha256})
    result = {"pooled": {"F1": 0.8, "JS": 0.7}, "mean": {"F1": 0.79, "JS": 0.72, "SE": 0.5}}
    installed = load_checkpoint(module.install(run, "skin", result))
    assert installed.model_card.tta is True and installed.model_card.metrics == {"F1": 0.8, "JS": 0.7, "mean F1": 0.79, "mean JS": 0.72}
    assert installed.provenance["parent_command"] == "r2unet train unet --epochs 6" and installed.provenance["parent_wall_time_s"] == 600
    assert "It started (`--init`) from unet-skin, trained by `r2unet train unet --epochs 6` (10 min)" in module._details(weights / "unet-skin.safetensors", 0.1)
    again = load_checkpoint(module.install(run, "skin", result))  # a second install: the parent is no longer shipped
    assert again.provenance["parent_command"] == "r2unet train unet --epochs 6"
    first = tmp_path / "round1.safetensors"  # a chain: the installed model -> round 1 (a file) -> round 2
    installed_now = load_checkpoint(weights / "unet-skin.safetensors")
    round1 = save(first, {"command": "r2unet train unet --init unet-skin --minutes 36", "wall_time_s": 2160,
                          "parent": "unet-skin", "parent_sha256": installed_now.sha256})
    round2_created = "2026-12-04T06:00:00+00:00"  # one run: its raw file and its installed copy share the time it was written
    save(run, {"command": f"r2unet train unet --init {first} --minutes 30", "parent": "round1", "parent_sha256": round1.sha256,
               "created": round2_created})
    chained = load_checkpoint(module.install(run, "skin", result)).provenance
    assert [step["command"] for step in chained["lineage"]] == [
        "r2unet train unet --init unet-skin --minutes 36", "r2unet train unet --init unet-skin", "r2unet train unet --epochs 6"]
    details = module._details(weights / "unet-skin.safetensors", 0.1)
    assert "It started (`--init`) from round1, trained by `r2unet train unet --init unet-skin --minutes 36` (36 min)" in details
    assert details.index("--minutes 36") < details.index("`r2unet train unet --init unet-skin`") < details.index("--epochs 6` (10 min)")
    again = load_checkpoint(module.install(run, "skin", result)).provenance  # the same run installed again keeps its chain
    assert [step["command"] for step in again["lineage"]] == [step["command"] for step in chained["lineage"]]
    # the next round starts from the raw file of the shipped run (no lineage in it: the install added that)
    raw = save(tmp_path / "raw.safetensors", {"command": f"r2unet train unet --init {first} --minutes 30", "parent": "round1",
                                              "parent_sha256": round1.sha256, "wall_time_s": 1800,
                                              "created": round2_created})
    save(run, {"command": f"r2unet train unet --init {tmp_path / 'raw.safetensors'} --minutes 85", "parent": "unet-skin",
               "parent_sha256": raw.sha256})
    first.unlink()  # round 1's file is gone (as a run folder cleaned up): the chain comes from the shipped copy of raw's run
    round3 = load_checkpoint(module.install(run, "skin", result)).provenance
    assert [step["command"] for step in round3["lineage"]] == [f"r2unet train unet --init {first} --minutes 30", *[step["command"] for step in chained["lineage"]]]
    lung = runs / "unet-lung.safetensors"
    save(lung, {"command": "r2unet train unet --no-rot90"})
    assert load_checkpoint(module.install(lung, "lung", result)).model_card.tta is False


# -- benchmarks/robustness.py: the transforms, the transformed set, the section ---------------------
@pytest.fixture
def robustness(monkeypatch):
    return _benchmark("robustness", monkeypatch)


@pytest.mark.parametrize("factor, expected", [(0.7, (28, 21)), (1.7, (68, 51)), (2.0, (80, 60))])
def test_rescale_gives_the_scaled_shape_and_binary_nearest_masks(robustness, factor, expected):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    mask = rng.random((40, 30)) > 0.7
    assert robustness.rescale_image(image, factor).shape == (*expected, 3)
    scaled = robustness.rescale_mask(mask, factor)
    assert scaled.shape == expected and scaled.dtype == bool
    if factor == 2.0:  # nearest neighbour: each pixel becomes a 2 x 2 block, nothing interpolated
        np.testing.assert_array_equal(scaled, mask.repeat(2, axis=0).repeat(2, axis=1))


def test_rescaled_fov_stays_a_binary_disc_of_the_same_fraction(robustness):
    yy, xx = np.mgrid[:60, :50]
    fov = ((yy - 30) ** 2 + (xx - 25) ** 2 < 22**2).astype(np.uint8) * 255  # 0/255 as DRIVE stores it
    for factor in (0.7, 1.7):
        scaled = robustness.rescale_mask(fov, factor)
        assert set(np.unique(scaled)) <= {False, True}
        assert abs(scaled.mean() - (fov > 0).mean()) < 0.02


def test_image_rescale_is_bilinear_and_antialiased(robustness):
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    rgb = np.stack([checker] * 3, axis=-1)
    down = robustness.rescale_image(rgb, 0.5)
    assert down.shape == (32, 32, 3) and down.dtype == np.uint8
    assert np.abs(down.astype(int) - 127).max() < 20  # averaged, not sampled (sampling gives 0 or 255)
    up = robustness.rescale_image(rgb, 1.7)
    assert len(np.unique(up)) > 2  # interpolated grey levels, not nearest


def test_colour_shift_follows_its_documented_formula(robustness):
    image = np.array([[[100, 100, 100], [255, 255, 255], [0, 0, 0]]], dtype=np.uint8)
    shifted = robustness.colour_shift(image)
    assert shifted.shape == image.shape and shifted.dtype == np.uint8
    expected_grey = np.rint(100 * robustness.COLOUR_GAINS + robustness.COLOUR_OFFSET)  # the mix keeps a grey
    np.testing.assert_array_equal(shifted[0, 0], expected_grey)
    np.testing.assert_array_equal(shifted[0, 1], np.minimum(255, np.rint(255 * robustness.COLOUR_GAINS + robustness.COLOUR_OFFSET)))
    np.testing.assert_array_equal(shifted[0, 2], robustness.COLOUR_OFFSET)
    red = robustness.colour_shift(np.array([[[200, 0, 0]]], dtype=np.uint8))[0, 0]
    assert red[1] > robustness.COLOUR_OFFSET[1]  # cross-talk: red light reaches the green channel
    with pytest.raises(ValueError, match="RGB"):
        robustness.colour_shift(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("gamma", [0.6, 1.6])
def test_gamma_is_monotone_and_keeps_black_and_white(robustness, gamma):
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = robustness.gamma_correct(ramp, gamma).ravel().astype(int)
    assert out.shape == (256,) and np.all(np.diff(out) >= 0) and out[0] == 0 and out[-1] == 255
    mid = out[128] - 128
    assert mid > 20 if gamma < 1 else mid < -20  # 0.6 brightens, 1.6 darkens the mid-tones
    with pytest.raises(ValueError, match="8-bit"):
        robustness.gamma_correct(ramp.astype(np.float32), gamma)


def test_jpeg_round_trip_changes_the_image_but_keeps_its_shape(robustness):
    from src_models.synthetic import vessel_image

    image = vessel_image((64, 48), seed=0, rgb=True)[0]
    out = robustness.jpeg_round_trip(image, 70)
    assert out.shape == image.shape and out.dtype == np.uint8
    difference = np.abs(out.astype(int) - image.astype(int))
    assert difference.max() > 0 and difference.mean() < 12
    assert np.abs(robustness.jpeg_round_trip(image, 20).astype(int) - image).mean() > difference.mean()


def test_every_transform_maps_an_rgb_image_to_its_size(robustness):
    image = np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    for transform in robustness.TRANSFORMS.values():
        if transform.image is not None:
            out = transform.image(image)
            assert out.dtype == np.uint8 and out.shape == (*robustness.scaled_size(image.shape, transform.factor), 3)
            assert not np.array_equal(out, image), transform.name


def _fake_drive(root: Path, ids=("01", "02"), shape=(44, 36)) -> Path:
    from src_models.synthetic import vessel_image

    for folder in ("images", "1st_manual", "mask"):
        (root / "test" / folder).mkdir(parents=True)
    for i, sample in enumerate(ids):
        image, mask = vessel_image(shape, seed=i, rgb=True)
        Image.fromarray(image).save(root / "test" / "images" / f"{sample}_test.tif")
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(root / "test" / "1st_manual" / f"{sample}_manual1.gif")
        Image.fromarray(np.full(shape, 255, np.uint8)).save(root / "test" / "mask" / f"{sample}_test_mask.gif")
    return root


def test_build_set_writes_the_transformed_set_outside_the_originals(robustness, tmp_path):
    from src_models.data import pair_files, read_image, read_mask

    drive = _fake_drive(tmp_path / "DRIVE")
    images, masks, fov, size = robustness.build_set(robustness.TRANSFORMS["x1.7"], drive, tmp_path / "x17")
    assert size == (75, 61) and all(str(p).startswith(str(tmp_path / "x17")) for p in (images, masks, fov))
    samples = pair_files(images, masks, fov)
    assert [s.id for s in samples] == ["01", "02"]
    assert read_image(samples[0].image).shape == (75, 61, 3) and read_mask(samples[0].mask).shape == (75, 61)
    assert read_mask(samples[0].fov).all()
    images, masks, fov, size = robustness.build_set(robustness.TRANSFORMS["gamma1.6"], drive, tmp_path / "g")
    assert size == (44, 36) and masks == drive / "test" / "1st_manual" and fov == drive / "test" / "mask"
    assert robustness.build_set(robustness.TRANSFORMS["native"], drive, tmp_path / "n")[0] == drive / "test" / "images"


def _rows(f1s: dict[str, float]) -> list[dict]:
    native = f1s["native"]
    return [{"transform": n, "height": 584, "width": 565, "threshold": 0.5, "F1": f, "AUC": 0.97, "SE": 0.8, "SP": 0.97,
             "dF1": f - native, "within": abs(f - native) <= 0.02, "seconds_per_image": 1.0} for n, f in f1s.items()]


def test_robustness_section_keeps_other_sections_and_replaces_only_its_models_table(robustness, tmp_path, monkeypatch):
    results_io = _benchmark("results_io", monkeypatch)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results on DRIVE\n\n| a |\n\n## Skin lesions (ISIC 2017) and lung fields (chest X-ray)\n\nskin\n")
    about = {"command": "benchmarks/robustness.py M --write", "date": "2026-01-01", "cpu": "CPU", "threads": "1 thread", "wall_s": 60}

    def write(model, options, f1s):
        body = results_io.section_body(results.read_text(), robustness.ROBUSTNESS_HEADING)
        block = robustness.run_block(model, options, _rows(f1s), about)
        results_io.write_section(robustness.ROBUSTNESS_HEADING, robustness.merge_run(body, robustness.run_heading(model, options), block), results)
        return results.read_text()

    write("r2unet-drive", [], {"native": 0.82, "x1.7": 0.70})
    text = write("unet-drive", ["--tta"], {"native": 0.81, "x1.7": 0.80})
    assert "### `r2unet-drive`\n" in text and "### `unet-drive`, `--tta`\n" in text and "| x1.7 | 565 x 584 | 0.7000" in text
    assert "outside: x1.7 (-0.1200)" in text and "**NO**" in text and "0 of 1 transforms; outside" in text and "1 of 1 transforms." in text
    text = write("r2unet-drive", [], {"native": 0.82, "x1.7": 0.81})
    assert text.count(robustness.ROBUSTNESS_HEADING) == 1 and "0.7000" not in text and "| x1.7 | 565 x 584 | 0.8100" in text
    assert text.index("### `r2unet-drive`") < text.index("### `unet-drive`")  # a rerun keeps its place
    assert "| x1.7 | 565 x 584 | 0.8000" in text  # the other model's table is kept
    assert text.startswith("# Results on DRIVE\n\n| a |\n\n## Skin lesions") and "chest X-ray)\n\nskin\n\n## Robustness" in text
    assert results_io.kept_sections(text).startswith("## Skin lesions") and robustness.ROBUSTNESS_HEADING in results_io.kept_sections(text)
    assert results_io.kept_sections(text.split("## Skin")[0] + text[text.index(robustness.ROBUSTNESS_HEADING):]).startswith("## Robustness")


def test_robustness_skips_without_drive_and_rejects_unknown_transforms(robustness, tmp_path, capsys):
    assert robustness.main(["r2unet-drive", "--drive", str(tmp_path / "nowhere")]) == 0
    assert "DRIVE not found" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        robustness.main(["r2unet-drive", "--transforms", "x1.7,blur", "--drive", str(tmp_path)])
    assert "unknown transform(s) blur; choose from native" in capsys.readouterr().err


@pytest.mark.slow
def test_robustness_runs_r2unet_evaluate_on_each_transformed_set(tmp_path, tiny_checkpoint):
    drive = _fake_drive(tmp_path / "DRIVE", shape=(48, 40))
    out = tmp_path / "robustness.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "robustness.py"), str(tiny_checkpoint), "--drive", str(drive),
                           "--transforms", "x0.7,jpeg70", "--threads", "1", "--json", str(out), "--", "--no-postprocess"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CPU: " in done.stdout and "wall time" in done.stdout
    result = json.loads(out.read_text())
    assert [r["transform"] for r in result["rows"]] == ["native", "x0.7", "jpeg70"] and result["options"] == ["--no-postprocess"]
    assert (result["rows"][1]["height"], result["rows"][1]["width"]) == (34, 28) and result["rows"][0]["dF1"] == 0
    assert all(0 <= r["F1"] <= 1 and r["within"] == (abs(r["dF1"]) <= 0.02) for r in result["rows"])


def test_the_recorded_command_leaves_out_the_json_copy_only(robustness):
    assert robustness.reproduce_command(["M", "--json", "/tmp/o.json", "--write", "--", "--json", "--tta"]) == \
        "benchmarks/robustness.py M --write -- --json --tta"
    assert robustness.reproduce_command(["M", "--json=o.json", "--threads", "1"]) == "benchmarks/robustness.py M --threads 1"


def test_hitl_simulation_short_form_on_synthetic_data(tmp_path, trained_checkpoint, monkeypatch):
    """The human-in-the-loop simulation end to end: 3 corrections, one retraining, the JSON steps."""
    from conftest import image_folder

    simulation = _benchmark("hitl_simulation", monkeypatch)
    images, truth = image_folder(tmp_path, count=4, size=64)
    out = tmp_path / "steps.json"
    monkeypatch.setenv("R2UNET_MODELS_DIR", str(tmp_path / "user-menu"))
    assert simulation.main([str(trained_checkpoint), "--images", str(images), "--masks", str(truth), "--order", "sequential",
                            "--finetune-every", "2", "--minutes", "0.05", "--epochs", "1", "--steps", "3",
                            "--validation", "none", "--json", str(out), "--threads", "1"]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert [s["images_corrected"] for s in steps] == [0, 1, 2, 3]
    assert [s.get("image") for s in steps] == [None, "im0", "im1", "im2"]
    assert steps[0]["pixels_to_fix"] is None and all(isinstance(s["pixels_to_fix"], int) for s in steps[1:])
    assert all(0.0 <= s["f1_rest"] <= 1.0 and 0.0 <= s["f1_rest_base"] <= 1.0 for s in steps)
    assert steps[1]["f1_rest_base"] == steps[1]["f1_rest"]  # no retraining yet: the same model on the same images
    assert [s["retrained"] for s in steps] == [False, False, True, False]
    assert steps[2]["model"] != steps[1]["model"]  # retrained on 2 corrections, the rest predicted again by the new version
    from src_models.inference import Segmenter
    from src_models.model_names import load_model
    from src_models.predict import card_options, final_labels

    model = load_model(str(trained_checkpoint))  # what the base model predicts for im0, counted here independently
    probs = Segmenter(model, device="cpu").predict(np.asarray(Image.open(images / "im0.png")))
    wrong = final_labels(probs, card_options(model), binary=True).astype(bool) != (np.asarray(Image.open(truth / "im0.png")) > 0)
    assert steps[1]["pixels_to_fix"] == int(wrong.sum()) > 0
    assert not (tmp_path / "user-menu").exists()  # its versions never reach the user's model menu


def test_hitl_write_replaces_only_its_own_run(tmp_path, monkeypatch):
    simulation = _benchmark("hitl_simulation", monkeypatch)
    import results_io

    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Other\n\nkept\n")
    monkeypatch.setattr(results_io, "RESULTS", results)
    steps = [{"images_corrected": 0, "pixels_to_fix": None, "f1_rest": 0.5, "f1_rest_base": 0.5, "seconds": 1.0, "retrained": False},
             {"images_corrected": 1, "image": "a", "pixels_to_fix": 1234, "f1_rest": 0.6, "f1_rest_base": 0.55, "seconds": 70.0,
              "retrain": True, "retrained": True}]
    about = {"model": "m", "order": "uncertainty", "finetune_every": 1, "minutes": 2.0, "transform": "native", "threads": 1,
             "date": "2026-12-02", "command": "benchmarks/hitl_simulation.py m"}
    simulation.write_run(about, steps)
    simulation.write_run({**about, "order": "random"}, steps)
    simulation.write_run(about, [*steps[:1], {**steps[1], "f1_rest": 0.7}])  # a rerun replaces its block only
    text = results.read_text()
    assert "## Other\n\nkept" in text and text.count(simulation.HITL_HEADING) == 1 and text.count("### ") == 2
    assert "| 1 | a | 1,234 | 0.7000 | 0.5500 | +0.1500 | yes (adopted) | 1.2 |" in text and "| 1 | a | 1,234 | 0.6000 |" in text
    assert text.index("order random") < text.index("order uncertainty")  # the rerun moved to the end


def test_gpu_check_dry_run_on_the_cpu(monkeypatch, capsys):
    """benchmarks/gpu_check.py stays runnable for the day a GPU is lent (its dry run prints every check)."""
    check = _benchmark("gpu_check", monkeypatch)
    assert check.main(["--device", "cpu", "--smoke"]) == 0
    out = capsys.readouterr().out
    for line in ("1. cpu float32 vs CPU: max |dp| 0.00e+00", "2. Segmenter default on cpu", "3. float32:", "4. fine-tune step on cpu",
                 "5. device memory after a fine-tune: n/a"):
        assert line in out, out


def test_pseudo_labels_keep_the_most_confident_pool_images_and_hold_out_only_real_labels(tmp_path, monkeypatch):
    import tifffile

    module = _benchmark("pseudo_labels", monkeypatch)
    images, masks, pool, pred = (tmp_path / n for n in ("images", "masks", "pool", "pred"))
    for folder in (images, masks, pool, pred):
        folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(images / f"a{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / f"a{i}.png")
    square = np.zeros((16, 16), np.uint8)
    square[4:12, 4:12] = 255
    sure = np.where(square > 0, 0.97, 0.02).astype(np.float32)
    doubtful = sure.copy()
    doubtful[2:14, 2:4] = 0.5  # a doubtful rim
    for stem, prob, mask in (("p_sure", sure, square), ("p_doubt", doubtful, square), ("p_empty", sure * 0, square * 0)):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(pool / f"{stem}.png")
        tifffile.imwrite(pred / f"{stem}.tif", mask)
        tifffile.imwrite(pred / f"{stem}_prob.tif", prob)
    assert [stem for _, stem in module.rank(pred)] == ["p_sure", "p_doubt"]  # an empty prediction is no label
    out = tmp_path / "out"
    assert module.main(["--pred", str(pred), "--pool", str(pool), "--images", str(images), "--masks", str(masks),
                        "--out", str(out), "--keep", "1", "--holdout", "2"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a0.png", "a1.png", "a2.png", "a3.png", "p_sure.png"]
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "p_sure.png")), square)
    assert (out / "val_ids.txt").read_text() == "a2,a3"
    with pytest.raises(SystemExit, match="is not empty"):  # an old run's pool images would be trained on too
        module.build(pred, pool, images, masks, out, 1, 2)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "p_sure.png")
    Image.fromarray(square).save(masks / "p_sure.png")
    with pytest.raises(SystemExit, match="share IDs"):
        module.build(pred, pool, images, masks, tmp_path / "out2", 1, 2)
