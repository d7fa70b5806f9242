"""HSTU, the Hierarchical Sequential Transduction Unit of Zhai et al., "Actions
Speak Louder than Words" (ICML 2024, arXiv 2402.17152), as in the paper's
public code (the version behind its MovieLens/Books tables). One layer is

    Eq. (1)  U(X), V(X), Q(X), K(X) = Split(phi1(f1(X)))
    Eq. (2)  A(X) V(X) = phi2(Q(X) K(X)^T + rab^{p,t}) V(X)
    Eq. (3)  Y(X) = f2(Norm(A(X) V(X)) * U(X))

with phi1 = phi2 = SiLU, X pre-normalised, a residual connection around the
layer and no feed-forward block. Everything runs on jagged [T, D] tensors.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import hstu_attention
from .jagged import jagged_to_padded, max_length, padded_index

NUM_TIME_BUCKETS = 128
TIME_BUCKET_LOG_WIDTH = 0.301  # buckets of ln(seconds): each is e^0.301 ~ 1.35x wider than the last
LAYER_NORM_EPS = 1e-6


def relative_bias_index(
    timestamps: torch.Tensor,
    target_timestamps: torch.Tensor,
    offsets: torch.Tensor,
    padded_length: int,
    max_seq_len: int,
    num_time_buckets: int = NUM_TIME_BUCKETS,
) -> torch.Tensor:
    """[B, L, L] index of each (query i, key j) into the flattened
    [num_time_buckets + 1, 2N - 1] table of `RelativeBucketedTimeAndPositionBias`:

        position(i, j) = N - 1 + j - i
        bucket(i, j)   = clamp(floor(ln(max(|target_ts[i] - ts[j]|, 1)) / 0.301), 0, 128)

    target_ts[i] is the time of what position i predicts (ts[i+1], or the request
    time at the last position), so the bias sees how long before the prediction
    each key happened. The index depends on the batch only, not on the weights:
    compute it once per forward and share it across layers.
    """
    index = padded_index(offsets, timestamps.size(0), padded_length)
    ts = jagged_to_padded(timestamps, offsets, padded_length, index=index)
    target_ts = jagged_to_padded(target_timestamps, offsets, padded_length, index=index)
    # |gap| is exact in int64; its log in float32 is what the reference computes.
    # ln(gap) >= 0, so truncating to long is the floor. (In-place: [B, L, L] is large.)
    gap = (target_ts.unsqueeze(2) - ts.unsqueeze(1)).abs_().float()
    time_bucket = gap.clamp_(min=1).log_().div_(TIME_BUCKET_LOG_WIDTH).clamp_(max=num_time_buckets).long()
    position = torch.arange(padded_length, device=offsets.device)
    relative_position = max_seq_len - 1 + position.unsqueeze(0) - position.unsqueeze(1)
    return time_bucket.mul_(2 * max_seq_len - 1).add_(relative_position)


class _TableLookup(torch.autograd.Function):
    """table[index] for a small 1-D table and a large index tensor. Same result
    as plain indexing; the backward sums the incoming gradient per table entry
    with one index_add_, several times faster on CPU than autograd's generic
    accumulate-scatter for indexing."""

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


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """rab^{p,t} of Eq. (2): a learned scalar per relative position (2N - 1 of
    them) plus one per log-bucketed time gap (129), shared by all heads."""

    def __init__(self, max_seq_len: int, num_time_buckets: int = NUM_TIME_BUCKETS) -> None:
        super().__init__()
        self.position_weights = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(0, 0.02))
        self.time_weights = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(0, 0.02))

    def forward(self, bias_index: torch.Tensor) -> torch.Tensor:
        """bias_index [B, L, L] from `relative_bias_index` -> rab [B, L, L]."""
        # Every (time bucket, relative position) sum in one small table, so the
        # [B, L, L] bias is a single gather (and its backward a single scatter).
        table = self.time_weights.unsqueeze(1) + self.position_weights.unsqueeze(0)
        return _TableLookup.apply(table.view(-1), bias_index)


class HSTULayer(nn.Module):
    """Eq. (1)-(3) on a pre-normalised input (LayerNorm without affine), with a
    residual connection and no feed-forward block. dropout acts on the gated
    attention output before f2."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        max_seq_len: int,
        dropout: float = 0.0,
        num_time_buckets: int = NUM_TIME_BUCKETS,
    ) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.max_seq_len = max_seq_len
        self.uvqk = nn.Linear(dim, 2 * num_heads * (v_dim + qk_dim), bias=False)  # f1
        self.rab = RelativeBucketedTimeAndPositionBias(max_seq_len, num_time_buckets)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(num_heads * v_dim, dim)  # f2
        nn.init.normal_(self.uvqk.weight, mean=0.0, std=0.02)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, bias_index: torch.Tensor) -> torch.Tensor:
        """x [T, D] jagged, bias_index [B, L, L] -> [T, D]."""
        T, H = x.size(0), self.num_heads
        normed_x = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)  # pre-norm, no affine
        # Eq. (1): one projection, SiLU over all of it, then split.
        u, v, q, k = F.silu(self.uvqk(normed_x)).split(
            [H * self.v_dim, H * self.v_dim, H * self.qk_dim, H * self.qk_dim], dim=-1
        )
        # Eq. (2): pointwise causal attention with the relative bias.
        attended = hstu_attention(
            q.view(T, H, self.qk_dim),
            k.view(T, H, self.qk_dim),
            v.view(T, H, self.v_dim),
            self.rab(bias_index),
            offsets,
            self.max_seq_len,
        ).reshape(T, H * self.v_dim)
        # Eq. (3): normalise A(X)V(X) (no affine), gate it with U(X), project back; residual.
        gated = u * F.layer_norm(attended, attended.shape[-1:], eps=LAYER_NORM_EPS)
        return x + self.out(self.dropout(gated))


class HSTU(nn.Module):
    """A stack of HSTU layers over a jagged batch."""

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        max_seq_len: int,
        dropout: float = 0.0,
        num_time_buckets: int = NUM_TIME_BUCKETS,
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.num_time_buckets = num_time_buckets
        self.layers = nn.ModuleList(
            HSTULayer(dim, num_heads, qk_dim, v_dim, max_seq_len, dropout, num_time_buckets)
            for _ in range(num_blocks)
        )

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor,
        target_timestamps: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, D], offsets [B+1], timestamps and target_timestamps [T] -> [T, D]."""
        bias_index = relative_bias_index(
            timestamps, target_timestamps, offsets, max_length(offsets), self.max_seq_len, self.num_time_buckets
        )
        for layer in self.layers:
            x = layer(x, offsets, bias_index)
        return x
