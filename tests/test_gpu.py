"""Accelerator paths (CUDA AMP, MPS): run only where such a device exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src_models.checkpoint import load_checkpoint
from src_models.devices import available_devices
from src_models.inference import Segmenter
from src_models.settings import DEFAULT_THRESHOLD
from src_models.synthetic import vessel_image

ACCELERATORS = [d for d in available_devices() if d != "cpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not ACCELERATORS, reason="no CUDA or MPS device here")
@pytest.mark.parametrize("device", ACCELERATORS)
def test_accelerator_matches_cpu(trained_checkpoint, device):
    checkpoint = load_checkpoint(trained_checkpoint)
    img, _ = vessel_image((300, 280), seed=0)
    cpu = Segmenter(checkpoint, "cpu").predict(img, tile=128)
    accelerated = Segmenter(checkpoint, device).predict(img, tile=128, batch_size=4)  # AMP on CUDA
    # AMP runs the convolutions in bfloat16/float16 (8 or 11 significant bits, eps 2^-8 / 2^-11):
    # a probability moves by at most 1/4 of its logit's error, a few half-precision roundings of
    # logits ~10, so 2e-2 bounds it by the format, not by one GPU's kernels; a mask pixel flips
    # only where p is within that of the threshold, which here is under 1 pixel in 1000
    assert np.abs(accelerated - cpu).max() < 2e-2
    assert ((accelerated >= DEFAULT_THRESHOLD) != (cpu >= DEFAULT_THRESHOLD)).mean() < 1e-3
    assert Segmenter(checkpoint, "auto").device.type == torch.device(ACCELERATORS[0]).type
