"""Peak memory and wall time of `r2unet predict` on a large image (default 8192 x 8192 RGB).

Usage: .venv/bin/python benchmarks/large_image.py [--size 8192] [--arch r2unet] [--workdir DIR] [--precision auto|fp32|bf16]

Makes a randomly initialised checkpoint of the default widths (the cost of inference does not
depend on the weights) and a synthetic vessel image tiled to the size, runs the real CLI in a
child process and prints its peak resident set size (RSS) and wall time.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from src_models.checkpoint import save_checkpoint
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig
from src_models.synthetic import vessel_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--arch", default="r2unet")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--precision", default="auto", help="passed to r2unet predict (bf16: OpenVINO on CPUs with native bf16)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="r2unet-large-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = ModelConfig(arch=args.arch)
    checkpoint = work / f"{args.arch}-random.safetensors"
    save_checkpoint(checkpoint, build_model(config), config, PreprocessConfig(), ["vessel"])
    tile, _ = vessel_image((1024, 1024), seed=0, n_vessels=40, rgb=True)
    reps = -(-args.size // 1024)
    image = work / f"large{args.size}.tif"
    tifffile.imwrite(image, np.tile(tile, (reps, reps, 1))[: args.size, : args.size])
    exe = Path(sys.executable).with_name("r2unet")
    start = time.perf_counter()
    subprocess.run([str(exe), "predict", str(checkpoint), str(image), "--out", str(work / "out"), "--precision", args.precision],
                   check=True)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{args.arch} predict {args.size}x{args.size} RGB, --precision {args.precision}: peak RSS {peak_mib:.0f} MiB, wall {wall:.0f} s ({work})")


if __name__ == "__main__":
    main()
