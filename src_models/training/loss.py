"""The training loss: weighted BCE + soft Dice (binary) or CE + soft Dice (multi-class), DDP-exact;
the Dice term generalised to Tversky's index, which weighs missed against false foreground."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
    fn_weight: float = 0.5,
) -> torch.Tensor:
    """Weighted BCE + soft Dice (K = 1) or CE + soft Dice (K >= 2) over the (global) batch.

    ``logits (N, K, H, W)`` (any float dtype; the loss has it), ``target (N, H, W)`` int64 labels,
    ``weight (N, H, W)`` >= 0.
    Under DDP, ``all_reduce`` (autograd-aware sum over processes) makes the Dice sums and the
    weight total global, and the CE term is scaled by ``world_size`` to undo DDP's gradient
    averaging, so N processes with batch B compute the gradient of one process with batch N*B.

    ``fn_weight`` (beta) makes the overlap term ``1 - (TP + 0.5) / (TP + (1 - beta) FP + beta FN + 0.5)``
    (Tversky et al.; Salehi et al. 2017 for segmentation): 0.5 is exactly the soft Dice, more than
    0.5 costs a missed foreground pixel more than a false one.
    """
    if logits.shape[1] == 1:
        t = target.to(logits.dtype)
        ce_sum = (F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none") * weight).sum()
        probs = torch.sigmoid(logits[:, 0])[:, None]
        onehot = t[:, None]
    else:
        ce_sum = (F.cross_entropy(logits, target, reduction="none") * weight).sum()
        probs = torch.softmax(logits, dim=1)[:, 1:]  # Dice on the foreground classes
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)[:, 1:]
    w = weight[:, None]
    total_weight = weight.sum()
    intersection = (probs * onehot * w).sum(dim=(0, 2, 3))
    predicted, actual = (probs * w).sum(dim=(0, 2, 3)), (onehot * w).sum(dim=(0, 2, 3))
    if all_reduce is not None:  # one collective for the four sums (the weight total carries no gradient)
        k = intersection.shape[0]
        summed = all_reduce(torch.cat([intersection, predicted, actual, total_weight.detach()[None]]))
        intersection, predicted, actual, total_weight = summed[:k], summed[k:2 * k], summed[2 * k:3 * k], summed[3 * k].detach()
    false_fg, missed = predicted - intersection, actual - intersection
    # at fn_weight 0.5, 2 x the Tversky denominator is 2 TP + FP + FN: the soft Dice, as before
    dice = 1 - (2 * intersection + 1.0) / (2 * (intersection + (1 - fn_weight) * false_fg + fn_weight * missed) + 1.0)
    return world_size * ce_sum / total_weight.clamp_min(1e-6) + dice.mean()

