"""table[index] for a small 1-D table and a large index tensor (the relative bias).

Same values as plain indexing (`table_lookup_reference`); the backward sums the
incoming gradient per table entry with one index_add_, several times faster on
CPU than autograd's generic accumulate-scatter for indexing."""

import torch


def table_lookup_reference(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return table[index]


class _TableLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.table_size = table.numel()
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad_table = grad.new_zeros(ctx.table_size).index_add_(0, index.flatten(), grad.flatten())
        return grad_table, None


def table_lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table [S] (1-D), index [...] -> [...] = table[index]."""
    return _TableLookup.apply(table, index)
