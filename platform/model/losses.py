"""Retrieval loss: sampled softmax over L2-normalised vectors, as in the HSTU
paper's public code. At every position with a target, the target competes with
`num_negatives` items drawn uniformly with replacement from 1..V (or from the
batch's targets, or both); negatives equal to the target (accidental hits) are masked. With a log-Q
correction each negative's logit is lowered by log Q, Q its expected count among the position's negatives,
so that the negatives' sum estimates the full softmax's (Yi et al. 2019)."""

import torch
import torch.nn.functional as F

from .ops.gathered_dot import gathered_dot

TEMPERATURE = 0.05
NUM_NEGATIVES = 128


def sample_negatives(
    target_ids: torch.Tensor,
    num_items: int,
    num_negatives: int = NUM_NEGATIVES,
    in_batch: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[P] target ids -> [P, num_negatives] negative ids, drawn with replacement,
    per position: uniformly from 1..num_items, or (in_batch) from `target_ids`
    themselves, i.e. the batch's other targets, popular items more often."""
    shape = (target_ids.size(0), num_negatives)
    device = target_ids.device
    if in_batch:
        return target_ids[torch.randint(0, target_ids.size(0), shape, generator=generator, device=device)]
    return torch.randint(1, num_items + 1, shape, generator=generator, device=device)


def log_expected_counts(target_counts: torch.Tensor, num_negatives: int, uniform: bool, in_batch: bool) -> torch.Tensor:
    """[V+1] each item's count among the training targets (index = item id) -> [V+1] log Q, Q the item's
    expected count among a position's negatives: num_negatives / V from the uniform pool, plus
    num_negatives x its share of the targets from the in-batch pool (the batch's targets, estimated by the
    training split's). With both pools, one Q for a negative from either: the pools' sum is what the
    position's candidates were drawn from, so sum(exp(logit - log Q)) over them estimates the full softmax's
    sum (a per-pool Q would count it twice). In-batch alone, an item never a target gets a count of 1."""
    counts = target_counts.double()
    expected = torch.zeros_like(counts)
    if uniform:
        expected += num_negatives / (counts.numel() - 1)
    if in_batch:
        expected += num_negatives * (counts if uniform else counts.clamp(min=1)) / counts.sum().clamp(min=1)
    return expected.log().float()


def sampled_softmax_loss(
    user_vectors: torch.Tensor,
    target_ids: torch.Tensor,
    item_vectors: torch.Tensor,
    negative_ids: torch.Tensor | None = None,
    num_negatives: int = NUM_NEGATIVES,
    temperature: float = TEMPERATURE,
    in_batch_negatives: bool = False,
    generator: torch.Generator | None = None,
    normalizer: torch.Tensor | float | None = None,
    negative_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The retrieval loss of a jagged batch: sum over positions with a target of
    -log softmax(target logit among target + negatives), divided by `normalizer`
    (default: the number of such positions, i.e. the mean).

    user_vectors [T, D]: encoder output (L2-normalised). target_ids [T]: the item
    each position must predict, 0 where there is none (skipped). item_vectors
    [V+1, D]: `SequentialEncoder.all_item_embeddings()`. negative_ids [P, K] for
    the P positions with a target, in order; when None they are drawn here with
    `generator` (`sample_negatives`). Logits are cosines / temperature; a
    negative equal to the target gets -inf, so it neither counts as a negative
    nor receives gradient. negative_log_q [P, K] (with negative_ids): log Q of each
    negative (`log_expected_counts`), subtracted from its scaled logit (log-Q
    correction). Pass the global target count (over all workers) as `normalizer`
    in data-parallel training. With no target at all the loss is a
    zero that still reaches every parameter (so DDP's gradient sync is joined).
    """
    has_target = target_ids > 0
    users, targets = user_vectors[has_target], target_ids[has_target]
    if targets.numel() == 0:
        return user_vectors.sum() * 0 + item_vectors.sum() * 0
    if negative_ids is None:
        negative_ids = sample_negatives(targets, item_vectors.size(0) - 1, num_negatives, in_batch_negatives, generator)
    candidates = torch.cat([targets.unsqueeze(1), negative_ids], dim=1)  # target in column 0
    logits = gathered_dot(users, item_vectors, candidates) / temperature
    if negative_log_q is not None:
        logits = logits - F.pad(negative_log_q.to(logits.dtype), (1, 0), value=0.0)
    accidental_hit = F.pad(negative_ids == targets.unsqueeze(1), (1, 0), value=False)
    logits = logits.masked_fill(accidental_hit, float("-inf"))
    loss = -F.log_softmax(logits, dim=1)[:, 0].mean()
    return loss if normalizer is None else loss * targets.size(0) / normalizer
