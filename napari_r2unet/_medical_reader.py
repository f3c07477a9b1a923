"""Reader for clinical files: DICOM (``*.dcm``, ``*.dicom``) and NIfTI (``*.nii``, ``*.nii.gz``) as an
Image layer in millimetres.

The pixels come from :mod:`src_models.medical_io` (modality LUT applied, MONOCHROME1 inverted,
full bit depth). The layer's ``scale`` is the pixel (or voxel) spacing, its contrast limits the
DICOM window (or the NIfTI cal_min/cal_max) when the file has one, and ``layer.metadata["medical"]``
holds the rest (:meth:`~src_models.medical_io.ImageMeta.to_dict`). A NIfTI volume's full affine
is kept: the spacing goes to ``scale`` and the rotation, flips and origin to the layer's
``affine``, so napari's world coordinates are the file's (in napari's axis order, z y x).

A file we cannot read gets one notification line naming it and the fix (never napari's generic
reader error) and adds no layer; paths that are not ours (other suffixes, lists, folders) are
declined so that other readers can try.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def get_medical_reader(path: str | list[str]) -> Any:
    """The reader for one DICOM or NIfTI file; ``None`` for anything else."""
    if isinstance(path, list) or Path(path).is_dir():
        return None
    from src_models.medical_io import medical_kind

    return read_medical if medical_kind(path, sniff=False) else None


def read_medical(path: str) -> list[tuple]:
    """``[(pixels, layer kwargs, "image")]``, or napari's "nothing to add" after a one-line notification."""
    from src_models.data import image_stem, read_image_with_meta
    from src_models.errors import R2UNetError

    from ._io import refuse

    try:
        array, meta = read_image_with_meta(path)
    except R2UNetError as exc:
        return refuse(str(exc).replace(str(path), Path(path).name), path)
    return [(array, layer_kwargs(array, meta, image_stem(path)), "image")]


def napari_transform(affine: np.ndarray, ndim: int) -> tuple[tuple[float, ...], np.ndarray]:
    """A NIfTI affine (voxel ``(i, j, k)`` -> world ``(x, y, z)``) as napari's ``scale`` and ``affine``
    for our ``(Z, Y, X)`` arrays: both axis orders reversed, the column lengths (the voxel
    spacing) as the scale, the rest (rotation, flips, origin) as an ``(ndim + 1)`` square matrix."""
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:ndim, :ndim][::-1, ::-1]
    scale = np.linalg.norm(linear, axis=0)
    scale[scale == 0] = 1.0
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] = linear / scale
    matrix[:ndim, ndim] = affine[:ndim, 3][::-1]
    return tuple(float(s) for s in scale), matrix


def layer_kwargs(array: np.ndarray, meta: Any, name: str) -> dict[str, Any]:
    """napari Image layer keyword arguments for a file read by :mod:`src_models.medical_io`."""
    ndim = array.ndim - int(meta.rgb)
    kwargs: dict[str, Any] = {"name": name, "rgb": meta.rgb, "metadata": {"medical": meta.to_dict()}}
    if meta.affine is not None:
        kwargs["scale"], kwargs["affine"] = napari_transform(meta.affine, ndim)
    elif meta.spacing is not None:
        kwargs["scale"] = tuple(meta.spacing)
    if meta.window is not None and not meta.rgb:
        centre, width = meta.window
        kwargs["contrast_limits"] = (centre - width / 2, centre + width / 2)
    return kwargs
