"""Run by test_distributed.py under torchrun: a short DDP training, then a cross-rank sync check.

Usage: torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR
Trains in float64 (see ddp_common.py). Writes OUT_DIR/ddp.safetensors (rank 0) and OUT_DIR/sync.json with the largest parameter
difference between ranks after training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the test helpers beside this file
from ddp_common import CONFIG, PP, float64, samples, train_config  # noqa: E402

from src_models.training import Trainer  # noqa: E402
from src_models.training.distributed import leave_group  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    with float64():
        trainer = Trainer(CONFIG, PP, samples(), train_config(), out / "ddp.safetensors")
        assert trainer.dist.world_size == 2, "run me under torchrun with 2 processes"
        for _ in trainer.run():
            pass
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(trainer.dist.world_size)]
    dist.all_gather(gathered, flat)
    if trainer.dist.is_main:
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        (out / "sync.json").write_text(json.dumps({"max_rank_difference": diff, "world_size": trainer.dist.world_size}))
    leave_group(trainer.dist)  # what r2unet train does at its end


if __name__ == "__main__":
    main()
