"""out[p, k] = <queries[p], table[ids[p, k]]>: the sampled-softmax logits.

The reference (`gathered_dot_reference`) gathers all P*K vectors at once (about
360 MB for an ML-1M batch), then back-propagates a gradient of that size through
a scatter. The fast version gathers in cache-sized chunks and its backward is two
embedding_bag reductions; together several times faster on CPU."""

import torch
import torch.nn.functional as F

# Work size (elements) of one chunk of the gathered [rows, K, D] block.
_GATHER_CHUNK_ELEMENTS = 1 << 20


def gathered_dot_reference(queries: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return (table[ids] * queries.unsqueeze(1)).sum(-1)


class _GatheredDot(torch.autograd.Function):
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
