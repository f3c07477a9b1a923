"""Distributed data parallel under ``torchrun``: who this process is, and agreeing across ranks.

With ``WORLD_SIZE > 1`` in the environment the same training code runs with DDP (nccl on CUDA,
gloo on CPU); rank 0 alone validates, logs and writes files. Without it, :class:`Distributed`
describes the single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: NCCL only reduces CUDA tensors, Gloo CPU ones."""
        import torch.distributed as dist

        if self.enabled and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group that torchrun describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def any_rank(flag: bool, dist_info: Distributed) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop together)."""
    if not dist_info.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_int(value: int, dist_info: Distributed) -> int:
    """Rank 0's ``value`` on every rank (so all ranks agree, e.g. on the early-stopping counter)."""
    if not dist_info.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=dist_info.device)
    dist.broadcast(t, 0)
    return int(t.item())


def barrier(dist_info: Distributed) -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def leave_group(dist_info: Distributed) -> None:
    """Leave the process group at the end of a run: all ranks together (a barrier first), since a
    rank tearing gloo down while its peer is still in it can abort the peer (SIGABRT). No-op in a
    single process."""
    if dist_info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def loss_reduction(dist_info: Distributed) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, int]:
    """The ``(all_reduce, world_size)`` arguments of :func:`~.loss.segmentation_loss`."""
    if not dist_info.enabled:
        return None, 1
    from torch.distributed.nn.functional import all_reduce

    return all_reduce, dist_info.world_size


def global_loss_value(loss: torch.Tensor, dist_info: Distributed) -> float:
    """The loss of the global batch (each rank's value counts its CE share world_size times)."""
    value = loss.detach().clone()
    if not dist_info.enabled:
        return float(value)
    import torch.distributed as dist

    dist.all_reduce(value)  # sum_r (W * ce_r / total + dice) = W * (ce + dice)
    return float(value) / dist_info.world_size
