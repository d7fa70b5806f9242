"""The ranking half of the generative loss: one head per task at item positions,
BCE on logits for binary tasks, MSE for regression tasks, weighted and summed."""

import torch
import torch.nn.functional as F


def multitask_loss(logits: torch.Tensor, labels: torch.Tensor, binary: torch.Tensor, weights: torch.Tensor,
                   normalizer: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, labels [P, tasks] at the P ranked positions (a NaN label: no label, skipped);
    binary [tasks] bool; weights [tasks]. Returns (sum_t w_t * sum_p loss_pt / normalizer,
    the per-task sums / normalizer, detached). normalizer defaults to P (a mean per position);
    in data-parallel training pass the global count over workers divided by the world size."""
    known = ~torch.isnan(labels)
    y = torch.where(known, labels, 0.0)
    per_entry = torch.where(binary, F.binary_cross_entropy_with_logits(logits, y, reduction="none"),
                            (logits - y) ** 2)
    per_task = torch.where(known, per_entry, 0.0).sum(0) / (logits.size(0) if normalizer is None else normalizer)
    # with no position at all the loss is a zero that still reaches every head (DDP's sync joins)
    return (per_task * weights).sum() + logits.sum() * 0, per_task.detach()
