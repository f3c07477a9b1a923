"""Image and mask files: reading, atomic writing, and pairing images with masks by sample ID.

This module owns the file side of the engine:

- :func:`read_image`: TIFF through tifffile (LZW/deflate need ``imagecodecs``, a dependency),
  PNG/JPEG/GIF/BMP through Pillow (palette images become gray), DICOM (``*.dcm``, ``*.dicom``,
  or any file with the DICM marker) and NIfTI (``*.nii``, ``*.nii.gz``) through
  :mod:`src_models.medical_io`; one-line errors naming the file. :func:`read_image_with_meta`
  also gives the file's :class:`~src_models.medical_io.ImageMeta` (spacing, window, affine).
- :func:`read_mask`: a binary mask from 0/1, 0/255 (or 0/max, or near-black/near-white palette)
  files; refuses other values.
- :func:`write_tiff`: atomic (temp file + rename) TIFF writing.
- :func:`pair_files`: images, masks and optional FOV masks in three folders paired by sample
  ID. Same stems pair first (``a.png`` / ``a.png``); otherwise IDs come from the stem with the
  usual role words removed, so DRIVE's ``21_training.tif``, ``21_manual1.gif`` and
  ``21_training_mask.gif`` all give ``21``. Unmatched or ambiguous files are an error that lists them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import R2UNetError
from .fileio import atomic_write
from .medical_io import DICOM_SUFFIXES, NIFTI_SUFFIXES, ImageMeta, has_dicom_magic, medical_kind

PLAIN_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp")
IMAGE_SUFFIXES = PLAIN_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES
# role words that name what a file is rather than which sample it shows (matched at the end of the stem)
_ROLE_WORDS = re.compile(
    r"([_\-. ](training|train|test|val|validation|image|img|mask|masks|manual\d*|label|labels|"
    r"gt|groundtruth|ground_truth|seg|segmentation|fov|annotation|annot|vessels?))+$",
    re.IGNORECASE,
)


def _image_suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def image_stem(path: str | os.PathLike[str]) -> str:
    """The name without its image suffix (``x.nii.gz`` -> ``x``); a file without one (a DICOM
    named by its UID, ``1.2.840.113619.2.5``) keeps its whole name."""
    path = Path(path)
    suffix = _image_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder`` (by suffix, or by the DICM marker for DICOM files
    without one), sorted; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise R2UNetError(f"folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and (_image_suffix(p) or has_dicom_magic(p)))
    if not files:
        raise R2UNetError(f"folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}, or DICOM files without a suffix)")
    return files


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """The pixels of an image file: ``(H, W)`` or ``(H, W, C)`` (TIFF may hold stacks; a
    multi-frame DICOM is ``(F, H, W)``, a NIfTI volume ``(Z, Y, X)``: see :mod:`.medical_io`)."""
    return read_image_with_meta(path)[0]


def read_image_with_meta(path: str | os.PathLike[str]) -> tuple[np.ndarray, ImageMeta]:
    """The pixels and the :class:`~src_models.medical_io.ImageMeta` of an image file (for TIFF, PNG
    and the like only its path: ``format="image"``, no spacing)."""
    path = Path(path)
    if not path.is_file():
        raise R2UNetError(f"image {path} does not exist or is not a file")
    try:
        kind = None if path.name.lower().endswith(PLAIN_SUFFIXES) else medical_kind(path)
        if kind is not None:
            from .medical_io import read_dicom, read_nifti

            return (read_dicom if kind == "dicom" else read_nifti)(path)
        return _read_plain(path), ImageMeta(str(path))
    except R2UNetError:
        raise
    except PermissionError as exc:
        raise R2UNetError(f"cannot read {path}: permission denied") from exc
    except Exception as exc:  # Pillow/tifffile raise many types for broken files
        raise R2UNetError(f"cannot read {path} as an image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from exc


def image_pixels(path: str | os.PathLike[str]) -> int | None:
    """The pixels of a TIFF or Pillow-readable image, every plane counted and the colour channels
    not, read from its header (the pixels are not decoded); None where it cannot tell (DICOM,
    NIfTI, an unreadable file)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes = series.shape, series.axes
            return int(np.prod([n for n, axis in zip(shape, axes) if axis not in "CS"]))
        from PIL import Image  # DICOM and NIfTI files are not Pillow's: None

        with Image.open(path) as img:
            return int(img.size[0] * img.size[1] * getattr(img, "n_frames", 1))
    except Exception:  # any reader's error: the size is unknown, nothing else depends on it
        return None


def _read_plain(path: Path) -> np.ndarray:
    """TIFF through tifffile, the other formats through Pillow."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            return np.asarray(tifffile.imread(path))
        except ValueError as exc:
            if "imagecodecs" in str(exc):
                raise R2UNetError(f"cannot read {path}: it is compressed; install imagecodecs (pip install imagecodecs)") from exc
            raise
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
            arr = np.asarray(img)
            if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
                arr = arr[..., 0]  # a gray palette (DRIVE's GIF masks)
            return np.array(arr)
        if img.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(img).astype(np.uint16)
        return np.array(img)


def binarize_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Binary masks -> bool ``(H, W)``: 0/1, 0/255, 0/max, or two gray levels whose lower one is
    near black (palette GIFs store e.g. 3 and 253, as DRIVE's second observer does); gray RGB
    (channels within 8 levels of each other) counts as gray. Anything else is an error."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        rgb = mask[..., :3].astype(np.int32)
        if int((rgb.max(axis=-1) - rgb.min(axis=-1)).max()) > 8:
            raise R2UNetError(f"{name} is a colour image; a mask must be gray with values 0 and 1 (or 0 and 255)")
        mask = rgb.mean(axis=-1).round().astype(np.uint8)
    if mask.ndim != 2:
        raise R2UNetError(f"{name} has shape {mask.shape}; a mask must be 2D (H, W)")
    values = np.unique(mask)
    if values.size == 2 and 0 < values[0] <= 0.1 * values[1]:
        return mask > values[0]
    if values.size > 2 or (values.size == 2 and values[0] != 0) or not np.all(np.isfinite(values.astype(np.float64))):
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if values.size > 6 else "")
        raise R2UNetError(f"{name} has values {shown}; a binary mask must hold only 0 and one other value (1 or 255)")
    return mask > 0


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A binary mask file -> bool ``(H, W)``; a NIfTI or multi-frame DICOM mask -> bool ``(Z, H, W)``
    (the same rule over the whole volume)."""
    mask, meta = read_image_with_meta(path)
    if meta.stack:
        return binarize_mask(mask.reshape(-1, mask.shape[-1]), name=f"mask {path}").reshape(mask.shape)
    return binarize_mask(mask, name=f"mask {path}")


def write_tiff(path: str | os.PathLike[str], array: np.ndarray, **kwargs: object) -> None:
    """Write ``array`` as a (zlib-compressed) TIFF atomically: ``path`` is never half-written."""
    import tifffile

    kwargs.setdefault("compression", "zlib")
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, array, **kwargs), suffix=".tif")


def sample_id(path: Path) -> str:
    """``21_training.tif`` -> ``21``, ``21_manual1.gif`` -> ``21``, ``a.png`` -> ``a``, ``ct_01.nii.gz`` -> ``ct_01``."""
    stem = image_stem(path)
    if stem.lower().endswith((".ome",)):
        stem = stem[:-4]
    stripped = _ROLE_WORDS.sub("", stem)
    return (stripped or stem).lower()


@dataclass(frozen=True)
class Sample:
    """One image with its mask and (optional) field-of-view mask."""

    id: str
    image: Path
    mask: Path | None = None
    fov: Path | None = None


def _index(files: list[Path], key: str) -> tuple[dict[str, Path], list[str]]:
    by_key: dict[str, list[Path]] = {}
    for f in files:
        by_key.setdefault(sample_id(f) if key == "id" else image_stem(f).lower(), []).append(f)
    clashes = [f"{k}: {', '.join(p.name for p in v)}" for k, v in by_key.items() if len(v) > 1]
    return {k: v[0] for k, v in by_key.items()}, clashes


def _match(images: list[Path], others: list[Path], what: str, folder: Path) -> dict[Path, Path]:
    for key in ("stem", "id"):
        img_index, img_clash = _index(images, key)
        oth_index, oth_clash = _index(others, key)
        if key == "stem" and set(img_index) != set(oth_index):
            continue  # not a same-stem layout: fall back to sample IDs
        if img_clash or oth_clash:
            raise R2UNetError(f"ambiguous sample IDs (several files per ID): {'; '.join(img_clash + oth_clash)}")
        missing = sorted(img_index[k].name for k in set(img_index) - set(oth_index))
        extra = sorted(oth_index[k].name for k in set(oth_index) - set(img_index))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"images without a {what} in {folder}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
            if extra:
                parts.append(f"{what}s without an image: {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
            raise R2UNetError("cannot pair files by sample ID; " + "; ".join(parts))
        return {img_index[k]: oth_index[k] for k in img_index}
    raise AssertionError("unreachable")


def pair_files(
    images: str | os.PathLike[str],
    masks: str | os.PathLike[str] | None = None,
    fov: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """Pair every image in ``images`` with one mask (and one FOV mask); sorted by sample ID."""
    image_files = list_images(images)
    mask_of = _match(image_files, list_images(masks), "mask", Path(masks)) if masks is not None else {}
    fov_of = _match(image_files, list_images(fov), "FOV mask", Path(fov)) if fov is not None else {}
    samples = [Sample(sample_id(p), p, mask_of.get(p), fov_of.get(p)) for p in image_files]
    return sorted(samples, key=lambda s: s.id)
