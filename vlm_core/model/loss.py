"""Cross-entropy on supervised tokens with InternVL's token / sample / square reductions.

Each supervised token (label != -100, after the usual one-position shift) of a sample with n
supervised tokens gets a weight: `token` 1, `sample` 1/n, `square` 1/sqrt(n) (InternVL 2.5/3's
recipes use square). The loss is sum(weight * ce) / sum(weight), where the denominator must be the
*whole global batch's*: every micro-batch of a gradient-accumulation step on every rank. Dividing
by each micro-batch's own total (what a naive per-batch mean does) weights tokens differently
depending on how the batch was split. So the loss takes the normaliser from outside:
`global_weight_total` computes it from the labels of all micro-batches and all-reduces it across
ranks. Because DDP / DeepSpeed *average* gradients over ranks, each rank's loss is multiplied by the
world size, which makes the averaged gradient equal that of the batch computed at once.

A packed batch (vlm_core.data.packing) holds several samples per row; its `sample_index` (rows, seq)
names each token's sample, and the per-sample count n is taken per sample instead of per row, so
packing weights every sample exactly as the unpacked batch does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlm_core.data.sample import IGNORE_INDEX

Reduction = Literal["token", "sample", "square"]


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t predicts token t+1."""
    return labels[..., 1:]


def token_weights(labels: torch.Tensor, reduction: Reduction,
                  sample_index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position weights (batch, seq-1), zero where the shifted label is ignored.

    sample_index: (batch, seq) the sample each token belongs to (a packed batch); None means one sample
    per row. The supervised-token count n of the `sample` / `square` reductions is per sample.
    """
    target = shifted_labels(labels)
    mask = target != IGNORE_INDEX
    if sample_index is None:
        n = mask.sum(dim=-1, keepdim=True).to(torch.float32).expand_as(target)  # supervised tokens per row
    else:
        segment = shifted_labels(sample_index).to(labels.device).clamp(min=0)
        counts = torch.zeros(int(segment.max()) + 1 if segment.numel() else 1, dtype=torch.float32, device=labels.device)
        counts.scatter_add_(0, segment[mask], torch.ones(int(mask.sum()), dtype=torch.float32, device=labels.device))
        n = counts[segment]  # supervised tokens of each position's sample
    if reduction == "token":
        per_sample = torch.ones_like(n)
    elif reduction == "sample":
        per_sample = torch.where(n > 0, 1.0 / n.clamp(min=1), torch.zeros_like(n))
    elif reduction == "square":
        per_sample = torch.where(n > 0, n.clamp(min=1).rsqrt(), torch.zeros_like(n))
    else:
        raise ValueError(f"train.loss_reduction={reduction!r}: must be one of token, sample, square")
    return mask.to(torch.float32) * per_sample


def weight_total(labels: torch.Tensor, reduction: Reduction, sample_index: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of token weights in one batch: its share of the normaliser."""
    return token_weights(labels, reduction, sample_index).sum()


def global_weight_total(label_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]],
                        reduction: Reduction) -> torch.Tensor:
    """The normaliser of one optimizer step: weight totals of all micro-batches, summed over ranks.

    Each micro-batch is its labels, or (labels, sample_index) for a packed one."""
    total = torch.zeros((), dtype=torch.float32)
    for item in label_batches:
        labels, index = item if isinstance(item, tuple) else (item, None)
        total = total + weight_total(labels.cpu(), reduction, None if index is None else index.cpu())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        total = total.to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def vlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: Reduction = "square",
    normalizer: torch.Tensor | float | None = None,
    world_size: int = 1,
    sample_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy of `logits` (batch, seq, vocab) against unshifted `labels` (batch, seq).

    normalizer: the global batch's weight total (`global_weight_total`); None uses this batch's own,
    i.e. the loss of this batch taken alone. world_size: ranks whose gradients get averaged.
    sample_index: a packed batch's per-token sample (vlm_core.data.packing); None: one sample per row.
    A batch with no supervised token gives a zero loss that still backpropagates (every rank must run
    the same graph under DeepSpeed).
    """
    target = shifted_labels(labels).to(logits.device)
    weights = token_weights(labels, reduction, sample_index).to(logits.device)
    ce = F.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.size(-1)).float(),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    weighted = (ce * weights.reshape(-1)).sum()
    denom = weights.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32)
    denom = denom.to(logits.device).clamp(min=torch.finfo(torch.float32).tiny)
    return weighted / denom * world_size
