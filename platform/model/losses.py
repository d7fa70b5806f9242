"""Retrieval loss: sampled softmax over L2-normalised vectors, as in the HSTU
paper's public code. At every position with a target, the target competes with
`num_negatives` items drawn uniformly with replacement from 1..V (or from the
batch's targets); negatives equal to the target (accidental hits) are masked."""

import torch
import torch.nn.functional as F

TEMPERATURE = 0.05
NUM_NEGATIVES = 128
# Work size (elements) of one chunk of the gathered [rows, K, D] block in `gathered_dot`.
_GATHER_CHUNK_ELEMENTS = 1 << 20


class _GatheredDot(torch.autograd.Function):
    """out[p, k] = <queries[p], table[ids[p, k]]> without a [P, K, D] tensor.

    The reference gathers all P*K vectors at once (about 360 MB for an ML-1M
    batch), then back-propagates a gradient of that size through a scatter. Here
    the forward gathers in cache-sized chunks and the backward is two
    embedding_bag reductions; together several times faster on CPU.
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(queries, table, ids)
        out = queries.new_empty(ids.shape)
        rows = max(1, _GATHER_CHUNK_ELEMENTS // max(1, ids.size(1) * table.size(1)))
        for start in range(0, ids.size(0), rows):
            chunk = slice(start, start + rows)
            torch.sum(F.embedding(ids[chunk], table) * queries[chunk].unsqueeze(1), dim=-1, out=out[chunk])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        queries, table, ids = ctx.saved_tensors
        grad = grad.contiguous()
        grad_queries = grad_table = None
        if ctx.needs_input_grad[0]:
            # d out / d queries[p] = sum_k grad[p, k] * table[ids[p, k]]
            grad_queries = F.embedding_bag(ids, table, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            # d out / d table[n] = sum over (p, k) with ids[p, k] == n of grad[p, k] * queries[p]:
            # sort the pairs by item id, then one weighted bag of query rows per item.
            flat_ids = ids.flatten()
            order = flat_ids.to(torch.int32).argsort()  # int32 sorts about twice as fast as int64
            counts = torch.bincount(flat_ids, minlength=table.size(0))
            grad_table = F.embedding_bag(
                order // ids.size(1),
                queries,
                counts.cumsum(0) - counts,
                per_sample_weights=grad.flatten()[order],
                mode="sum",
            )
        return grad_queries, grad_table, None


def gathered_dot(queries: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """queries [P, D], table [V+1, D], ids [P, K] -> [P, K] dot products."""
    return _GatheredDot.apply(queries, table, ids)


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


def softmax_loss_with_negatives(
    user_vectors: torch.Tensor,
    target_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    item_vectors: torch.Tensor,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """Mean over P positions of -log softmax(target logit among target + negatives).

    user_vectors [P, D] and item_vectors [V+1, D] (row = item id) L2-normalised;
    target_ids [P] > 0; negative_ids [P, K]. Logits are cosines / temperature; a
    negative equal to the target (accidental hit) gets -inf, so it neither
    counts as a negative nor receives gradient.
    """
    candidates = torch.cat([target_ids.unsqueeze(1), negative_ids], dim=1)  # target in column 0
    logits = gathered_dot(user_vectors, item_vectors, candidates) / temperature
    accidental_hit = F.pad(negative_ids == target_ids.unsqueeze(1), (1, 0), value=False)
    logits = logits.masked_fill(accidental_hit, float("-inf"))
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def sampled_softmax_loss(
    user_vectors: torch.Tensor,
    target_ids: torch.Tensor,
    item_vectors: torch.Tensor,
    num_negatives: int = NUM_NEGATIVES,
    temperature: float = TEMPERATURE,
    in_batch_negatives: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The training loss of a jagged batch.

    user_vectors [T, D]: encoder output (L2-normalised). target_ids [T]: the item
    each position must predict, 0 where there is none (those positions are
    skipped). item_vectors [V+1, D]: `SequentialEncoder.all_item_embeddings()`.
    generator drives the negative sampling (deterministic runs).
    Returns the mean loss over positions with a target.
    """
    has_target = target_ids > 0
    users, targets = user_vectors[has_target], target_ids[has_target]
    negatives = sample_negatives(targets, item_vectors.size(0) - 1, num_negatives, in_batch_negatives, generator)
    return softmax_loss_with_negatives(users, targets, negatives, item_vectors, temperature)
