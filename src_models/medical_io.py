"""Clinical image files, torch-free: DICOM (pydicom) and NIfTI (nibabel), read with their geometry.

- :func:`read_dicom`: one DICOM file -> ``(pixels, ImageMeta)``. The modality LUT (Rescale
  Slope/Intercept, or a Modality LUT Sequence; per frame for enhanced multi-frame objects) is
  applied with pydicom's own ``apply_modality_lut``; MONOCHROME1 (bright = low values) is inverted
  so that bright means dense as in MONOCHROME2, over the range the stored bits allow (a 12-bit
  MONOCHROME1 value ``v`` becomes ``4095 - v``; the window centre moves with it). The full bit
  depth is kept (uint16/int16/int32, or float32 for non-integral rescales): the percentile
  normalisation of :mod:`src_models.preprocessing` handles any of them. Colour images come back
  as ``(H, W, 3)`` RGB (YBR and palette colour converted).
- :func:`read_nifti`: one ``.nii`` / ``.nii.gz`` file -> ``(voxels, ImageMeta)``. A 3D volume
  stored ``(X, Y, Z)`` (nibabel's ``(i, j, k)``) comes back as ``(Z, Y, X)``: slices first, then
  rows (j) and columns (i), the NumPy order SimpleITK also uses, so ``volume[z]`` is one axial
  slice of a usual CT. The affine (voxel ``(i, j, k)`` -> world mm) is kept in the metadata.
- :func:`write_nifti_labels`: the inverse transform: ``(Z, Y, X)`` labels go back to ``(X, Y, Z)``
  uint8 with the input's affine, qform/sform codes and units, so the label volume overlays its
  image in other viewers (ITK-SNAP, 3D Slicer, FSLeyes). Written atomically.

A multi-frame DICOM is read as an ``(F, H, W)`` (or ``(F, H, W, 3)``) stack rather than refused:
every frame of one DICOM object shares its Rows x Columns and pixel format by construction (one
PixelData element), so it is always a stack of same-size images (a cine loop, a tomosynthesis or
enhanced CT/MR series), segmented slice by slice. What is refused, with one line naming the fix:
no pixel data (a report or structured document), a non-image object, a compressed transfer
syntax without an installed decoder (the line names the syntax and the pip packages that decode
it), pixel data that does not decode (truncated), a file that is not DICOM; a NIfTI time series
(4th dimension > 1), RGB voxels, or a file nibabel cannot read.

pydicom and nibabel are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import R2UNetError
from .fileio import atomic_write

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
_PIP_NAMES = {"gdcm": "python-gdcm"}  # pydicom names the import, pip installs the package


@dataclass(frozen=True)
class ImageMeta:
    """What a file says about its pixels besides their values.

    ``spacing`` has one entry per spatial axis of the array (RGB's channel axis excluded), in
    the array's order: ``(row, col)`` mm for a 2D image, ``(slice, row, col)`` for a stack or
    volume; ``None`` when the file does not say. ``window`` is ``(centre, width)`` in the units
    of the returned values. ``affine`` (NIfTI) maps voxel ``(i, j, k, 1)`` to world mm.
    ``stack``: axis 0 holds slices or frames, never colour channels.
    """

    path: str
    format: str = "image"  # "dicom", "nifti", or "image" for the other formats
    spacing: tuple[float, ...] | None = None
    window: tuple[float, float] | None = None
    modality: str = ""
    photometric: str = ""
    affine: np.ndarray | None = field(default=None, compare=False)
    stack: bool = False
    rgb: bool = False
    header: Any = field(default=None, compare=False, repr=False)  # the NIfTI header, for writing labels like it

    @property
    def pixel_spacing(self) -> tuple[float, float] | None:
        """``(row, col)`` spacing in mm."""
        return None if self.spacing is None else (self.spacing[-2], self.spacing[-1])

    def summary(self) -> str:
        """One line for logs: format, modality, photometric interpretation, spacing, window."""
        parts = [self.format.upper() + (f" {self.modality}" if self.modality else "")]
        if self.photometric:
            parts.append(self.photometric + (" (inverted to bright = dense)" if self.photometric == "MONOCHROME1" else ""))
        if self.spacing is not None:
            parts.append(("voxel" if self.format == "nifti" and len(self.spacing) == 3 else "pixel") + " spacing "
                         + " x ".join(f"{s:.4g}" for s in self.spacing) + " mm")
        if self.window is not None:
            parts.append(f"window {self.window[0]:g}/{self.window[1]:g}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (the affine as nested lists; the header left out)."""
        return {"path": self.path, "format": self.format, "spacing": list(self.spacing) if self.spacing else None,
                "window": list(self.window) if self.window else None, "modality": self.modality,
                "photometric": self.photometric, "stack": self.stack, "rgb": self.rgb,
                "affine": None if self.affine is None else np.asarray(self.affine).tolist()}


# -- which files ---------------------------------------------------------------------------------
def has_dicom_magic(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` has the ``DICM`` marker at byte 128 (the DICOM file preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def medical_kind(path: str | os.PathLike[str], sniff: bool = True) -> str | None:
    """``"dicom"`` for ``*.dcm`` / ``*.dicom`` (and, with ``sniff``, any file with the DICM marker),
    ``"nifti"`` for ``*.nii`` / ``*.nii.gz``, else ``None``."""
    name = Path(path).name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return "dicom" if sniff and has_dicom_magic(path) else None


# -- DICOM ---------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _open_dicom(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:  # no DICM marker: an old ACR-NEMA file without preamble, or no DICOM at all
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            ds = None
        if ds is None or "Rows" not in ds:
            raise R2UNetError(f"{path.name} is not a DICOM file (no 'DICM' marker and no image elements); "
                              "export the image from the PACS or modality as DICOM") from None
    except Exception as exc:  # pydicom raises many types for a damaged header
        raise R2UNetError(f"cannot read {path.name} as DICOM ({_first_line(exc)}); the file may be truncated or damaged: copy it again") from exc
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files read without a file meta header get the transfer syntax their encoding implies."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit, little = getattr(ds, "original_encoding", (True, True))
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian


def _pip_commands(missing: list[str]) -> str:
    """pydicom's ``Decoder.missing_dependencies`` lines (``"pylibjpeg - requires pylibjpeg>=2.0 and
    pylibjpeg-libjpeg>=2.1"``) -> ``pip install pylibjpeg pylibjpeg-libjpeg (or pip install python-gdcm)``."""
    commands = []
    for line in missing:
        _, _, needs = line.partition(" - requires ")
        names = [re.match(r"[A-Za-z0-9_.\-]+", req.strip()) for req in re.split(r",|\band\b", needs)]
        packages = [_PIP_NAMES.get(m.group(), m.group()) for m in names if m and m.group() != "numpy"]
        if packages:
            commands.append("pip install " + " ".join(packages))
    commands.sort(key=lambda c: "pylibjpeg" not in c)  # pure wheels first
    if not commands:
        return "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or pip install python-gdcm)"
    return commands[0] + (f" (or {', or '.join(commands[1:])})" if len(commands) > 1 else "")


def _check_decoder(ds: Any, name: str) -> None:
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.TransferSyntaxUID
    syntax = f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)
    try:
        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError):
        raise R2UNetError(f"{name} uses the transfer syntax {syntax}, which pydicom cannot decode; "
                          "convert it to an uncompressed DICOM first (e.g. gdcmconv --raw in.dcm out.dcm)") from None
    if not decoder.is_available:
        raise R2UNetError(f"{name} is compressed as {syntax} and no decoder for it is installed; "
                          f"install one: {_pip_commands(decoder.missing_dependencies)}")


def _group_item(ds: Any, sequence: str, frame: int | None = None) -> Any:
    """The first item of ``sequence`` in the shared functional groups (``frame=None``) or in a
    frame's functional group of an enhanced multi-frame object; ``None`` if absent."""
    groups = ds.get("SharedFunctionalGroupsSequence") if frame is None else ds.get("PerFrameFunctionalGroupsSequence")
    if not groups or len(groups) <= (frame or 0):
        return None
    items = groups[frame or 0].get(sequence)
    return items[0] if items else None


def _attribute(ds: Any, sequence: str, keyword: str) -> Any:
    """``keyword`` from the dataset itself, else from its shared or first per-frame functional group."""
    if keyword in ds:
        return ds.get(keyword)
    for frame in (None, 0):
        item = _group_item(ds, sequence, frame)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _modality_sources(ds: Any, frames: int) -> list[Any]:
    """The datasets holding each frame's rescale: the image itself, or the enhanced multi-frame
    Pixel Value Transformation (one for all frames, or one per frame)."""
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return [ds]
    per_frame = [_group_item(ds, "PixelValueTransformationSequence", i) for i in range(frames)] if frames > 1 else []
    if per_frame and all(item is not None and "RescaleSlope" in item for item in per_frame):
        return per_frame
    shared = _group_item(ds, "PixelValueTransformationSequence")
    return [shared if shared is not None and "RescaleSlope" in shared else ds]


def _compact(values: np.ndarray) -> np.ndarray:
    """Floats that hold whole numbers -> the smallest of uint16/int16/int32 that holds them (no
    precision lost, a quarter of float64's memory); other floats -> float32; integers unchanged."""
    if values.dtype.kind in "biu":
        return values
    finite = np.isfinite(values).all()
    if finite and values.size and np.array_equal(values, np.round(values)):
        low, high = values.min(), values.max()
        for dtype in (np.uint16, np.int16, np.int32):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                return values.astype(dtype)
    return values.astype(np.float32)


def _stored_range(ds: Any) -> np.ndarray:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    return np.array([0, 2**bits - 1], dtype=np.int64)


def _monochrome(ds: Any, pixels: np.ndarray, frames: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Modality LUT, then MONOCHROME1 inverted; returns the values and the (moved) window."""
    from pydicom.pixels import apply_modality_lut

    sources = _modality_sources(ds, frames)
    if len(sources) == 1:
        values = apply_modality_lut(pixels, sources[0])
    else:
        values = np.stack([apply_modality_lut(pixels[i], s) for i, s in enumerate(sources)])
    window = _window(ds)
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        low, high = (float(v) for v in apply_modality_lut(_stored_range(ds), sources[0]))
        values = (low + high) - values.astype(np.float64)
        window = None if window is None else (low + high - window[0], window[1])
    return _compact(values), window


def _window(ds: Any) -> tuple[float, float] | None:
    centre, width = (_attribute(ds, "FrameVOILUTSequence", k) for k in ("WindowCenter", "WindowWidth"))
    if centre is None or width is None:
        return None
    from pydicom.multival import MultiValue

    first = [v[0] if isinstance(v, (MultiValue, list, tuple)) else v for v in (centre, width)]  # the first of several windows
    try:
        c, w = float(first[0]), float(first[1])
    except (TypeError, ValueError):
        return None
    return (c, w) if np.isfinite(c) and np.isfinite(w) and w > 0 else None


def _spacing(ds: Any, frames: int) -> tuple[float, ...] | None:
    pixel = _attribute(ds, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing") or ds.get("NominalScannedPixelSpacing")
    try:
        row, col = (float(v) for v in pixel)
    except (TypeError, ValueError):
        return None
    if not (row > 0 and col > 0):
        return None
    if frames == 1:
        return (row, col)
    between = _attribute(ds, "PixelMeasuresSequence", "SpacingBetweenSlices") or _attribute(ds, "PixelMeasuresSequence", "SliceThickness")
    try:
        depth = float(between) if between is not None and float(between) > 0 else 1.0
    except (TypeError, ValueError):
        depth = 1.0
    return (depth, row, col)


def read_dicom(path: str | os.PathLike[str]) -> tuple[np.ndarray, ImageMeta]:
    """One DICOM file -> ``(H, W)`` (or ``(H, W, 3)``) pixels, a multi-frame one -> ``(F, H, W[, 3])``,
    with its :class:`ImageMeta`. See the module docstring for the values and the refusals."""
    from pydicom.pixels import apply_color_lut, pixel_array
    from pydicom.pixels.utils import get_nr_frames

    path = Path(path)
    ds = _open_dicom(path)
    name = path.name
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None and getattr(sop, "name", "") else ""
        raise R2UNetError(f"{name} holds no image (PixelData missing): it may be a report or structured document{kind}; "
                          "open an image file of the series instead")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if k not in ds]
    if missing:
        raise R2UNetError(f"{name} is not an image DICOM: its pixel data comes without {', '.join(missing)}; "
                          "export the image again from the PACS or modality")
    _check_decoder(ds, name)
    frames = get_nr_frames(ds, warn=False)
    photometric = str(ds.PhotometricInterpretation).upper()
    try:
        pixels = pixel_array(ds)
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        window = None
        if photometric.startswith("MONOCHROME"):
            pixels, window = _monochrome(ds, pixels, frames)
    except R2UNetError:
        raise
    except Exception as exc:  # pydicom raises many types for damaged pixel data
        raise R2UNetError(f"cannot decode the pixels of {name} ({_first_line(exc)}); the file may be truncated or damaged: copy it again") from exc
    rgb = photometric in _COLOUR and pixels.ndim == (3 if frames == 1 else 4)
    meta = ImageMeta(str(path), "dicom", _spacing(ds, frames), window, str(ds.get("Modality") or ""), photometric,
                     stack=frames > 1, rgb=rgb)
    return np.ascontiguousarray(pixels), meta


# -- NIfTI ---------------------------------------------------------------------------------------
def _load_nifti(path: Path) -> Any:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel, gzip and zlib raise many types for damaged files
        raise R2UNetError(f"cannot read {path.name} as NIfTI ({_first_line(exc)}); "
                          "check that it is a .nii or .nii.gz file and not truncated") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise R2UNetError(f"{path.name} is a {type(img).__name__}, not a NIfTI image; convert it to .nii.gz")
    return img


def _spatial_shape(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Drop trailing length-1 axes beyond the third; refuse time series and other 4D+ data."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise R2UNetError(f"{name} is 4D (time series of {shape[3]} volumes, shape {shape}); give one 3D volume "
                          "(e.g. fslroi in.nii.gz one.nii.gz 0 1, or nibabel's img.slicer[..., 0])")
    if len(shape) > 4 or len(shape) < 2:
        raise R2UNetError(f"{name} is {len(shape)}D (shape {shape}); give one 2D image or 3D volume")
    return shape


def read_nifti(path: str | os.PathLike[str]) -> tuple[np.ndarray, ImageMeta]:
    """A NIfTI image -> ``(Z, Y, X)`` voxels for a volume (``(Y, X)`` for a 2D image) with its
    :class:`ImageMeta` (affine, voxel spacing in the array's order, cal_min/cal_max as window)."""
    from nibabel.affines import voxel_sizes

    path = Path(path)
    img = _load_nifti(path)
    shape = _spatial_shape(img.shape, path.name)
    try:
        data = np.asanyarray(img.dataobj)  # applies scl_slope / scl_inter
    except Exception as exc:
        raise R2UNetError(f"cannot read the voxels of {path.name} ({_first_line(exc)}); the file may be truncated: copy it again") from exc
    if data.dtype.names:
        raise R2UNetError(f"{path.name} holds RGB voxels; give a gray-level volume (one value per voxel)")
    volume = np.ascontiguousarray(_compact(data.reshape(shape)).T)  # (X, Y, Z) -> (Z, Y, X)
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = tuple(float(s) for s in voxel_sizes(affine)[: len(shape)][::-1])
    header = img.header
    low, high = float(header["cal_min"]), float(header["cal_max"])
    window = ((low + high) / 2, high - low) if high > low else None
    meta = ImageMeta(str(path), "nifti", spacing, window, affine=affine, stack=volume.ndim == 3, header=header.copy())
    return volume, meta


def write_nifti_labels(path: str | os.PathLike[str], labels: np.ndarray, affine: np.ndarray, header: Any = None) -> None:
    """Write ``(Z, Y, X)`` (or ``(Y, X)``) labels as a uint8 NIfTI (``.nii`` or ``.nii.gz``) whose voxel
    ``(i, j, k)`` is ``labels[k, j, i]``, with ``affine``; with the input's ``header`` its qform/sform
    codes and units too, so the labels overlay the input volume in other viewers. Atomic."""
    import nibabel as nib

    target = Path(path)
    if not target.name.lower().endswith(NIFTI_SUFFIXES):
        raise R2UNetError(f"{target.name}: a NIfTI label file must end with .nii or .nii.gz")
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or labels.dtype.kind not in "biu":
        raise R2UNetError(f"labels of shape {labels.shape} and dtype {labels.dtype}: NIfTI labels must be a 2D or 3D integer array")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise R2UNetError(f"labels range {labels.min()}..{labels.max()} does not fit uint8; NIfTI labels must be 0..255")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise R2UNetError(f"the affine must be a finite 4 x 4 matrix, got shape {affine.shape}")
    data = np.ascontiguousarray(labels.astype(np.uint8).T)
    if header is not None and tuple(header.get_data_shape())[: data.ndim] != data.shape:
        raise R2UNetError(f"labels of shape {labels.shape} do not match the input volume {tuple(header.get_data_shape())[::-1]}")
    img = nib.Nifti1Image(data, affine)
    codes = (1, 1) if header is None else (int(header["qform_code"]), int(header["sform_code"]))
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    out = img.header
    out.set_data_dtype(np.uint8)
    out.set_slope_inter(1.0, 0.0)  # the input's rescale (e.g. CT's -1024) must not shift the labels
    out.set_intent("label")
    out["cal_min"], out["cal_max"] = 0, int(labels.max()) if labels.size else 0
    if header is not None:
        out.set_xyzt_units(*header.get_xyzt_units())
    suffix = ".nii.gz" if target.name.lower().endswith(".gz") else ".nii"
    atomic_write(target, lambda tmp: nib.save(img, tmp), suffix=suffix)
