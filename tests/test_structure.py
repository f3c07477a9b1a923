"""Project rules that keep the layers apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy", "superqt")


@pytest.mark.parametrize("path", sorted((ROOT / "src_models").rglob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_gui_libraries(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


# what each torch-free module is used for, run in a fresh interpreter ({tmp} is a temporary folder)
TORCH_FREE_USES = {
    "tiling and labels": "from src_models import tiling, labels; "
                         "tiling.sliding_window_inference(np.zeros((1, 40, 40), np.float32), 16, 2, lambda b: b, 0.25); "
                         "labels.probabilities_to_labels(np.zeros((1, 4, 4)))",
    "training config and fine-tune assembly": "import src_models.training, src_models.training.config as c, src_models.finetune; "
                                              "c.finetune_config(); from src_models.training import TrainEvent, make_sample, resume_path",
    "reading an image and writing a mask": "from src_models.data import read_image, write_tiff; "
                                           "write_tiff('{tmp}/m.tif', np.ones((4, 4), np.uint8)); read_image('{tmp}/m.tif')",
    "reading NIfTI and writing labels (DICOM: the same module)": "from src_models.medical_io import read_nifti, write_nifti_labels; "
                                                                 "write_nifti_labels('{tmp}/l.nii.gz', np.ones((2, 4, 4), np.uint8), np.eye(4)); "
                                                                 "read_nifti('{tmp}/l.nii.gz'); import pydicom.pixels",
    "a folder session and its label files": "import os; from PIL import Image; os.makedirs('{tmp}/im'); "
                                            "Image.fromarray(np.zeros((8, 8), np.uint8)).save('{tmp}/im/a.png'); "
                                            "from src_models.annotation import FolderSession; from src_models.label_files import read_label_file; "
                                            "s = FolderSession('{tmp}/im'); s.save_prediction('a', np.full((1, 8, 8), 0.4, np.float32), "
                                            "np.zeros((8, 8), np.uint8), 'm'); s.save_correction('a', np.ones((8, 8), np.uint8)); "
                                            "assert read_label_file('{tmp}/im/labels/a.tif')[0].all(); s.close()",
}


@pytest.mark.parametrize("use", sorted(TORCH_FREE_USES))
def test_torch_free_modules_never_import_torch_or_napari(use, tmp_path):
    probe = f"import sys, numpy as np; {TORCH_FREE_USES[use].format(tmp=tmp_path)}; print(sorted(m for m in ('torch', 'napari') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_importing_the_core_package_is_light():
    probe = "import sys, src_models, src_models.errors; print(sorted(m for m in ('torch', 'numpy', 'napari') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment")
    result = subprocess.run([str(ruff), "check", "src_models", "napari_r2unet", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_napari_hub_metadata_and_manifest_validate():
    """napari hub readiness: the metadata the hub shows, and `npe2 validate` clean."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["readme"] == "README.md" and project["description"] and project["keywords"]
    assert {"Framework :: napari", "License :: OSI Approved :: BSD License"} <= set(project["classifiers"])
    npe2 = Path(sys.executable).with_name("npe2")
    run = subprocess.run([str(npe2), "validate", "napari-r2unet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "valid" in run.stdout, run.stdout + run.stderr
