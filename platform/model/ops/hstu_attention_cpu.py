"""HSTU attention on CPU without the [B, L, L] bias or the masked upper half:
same signature and numbers as hstu_attention_reference (see there for the math).

Users are sorted by length, longest first, and padded to [B, H, L, d]. Query
tiles [s, e) then only involve the users longer than s (a prefix of the sorted
batch) and the keys [0, e): the cost follows the real jagged lengths at tile
granularity, the way Stochastic Length expects. The bias of a tile is gathered
from the two tables when the tile is computed, and again in the backward (which
is hand-written: it recomputes the scores of a tile instead of keeping them, and
scatters the bias gradient straight into the tables). Only the time buckets of the
causal tiles are kept from the forward to the backward, one byte each.
"""

import torch

from .hstu_attention_reference import time_buckets

TILE = 64  # query rows per tile: smaller tiles waste less of the masked upper half, larger ones less Python


class _Batch:
    """Bookkeeping of a jagged batch in the sorted, padded layout (no gradients)."""

    def __init__(self, offsets, timestamps, target_timestamps, num_targets, num_tokens, max_seq_len, num_buckets):
        lengths = offsets.diff()
        self.lengths, order = lengths.sort(descending=True, stable=True)
        self.batch_size = lengths.numel()
        self.max_len = int(self.lengths[0]) if self.batch_size else 0
        rank = torch.empty_like(order)
        rank[order] = torch.arange(self.batch_size)
        user = torch.arange(self.batch_size).repeat_interleave(lengths, output_size=num_tokens)
        pos = torch.arange(num_tokens) - offsets[:-1][user]
        self.row = rank[user] * self.max_len + pos  # token -> row of the flattened [B * L] layout
        self.ts = self.pad(timestamps)
        self.target_ts = self.pad(target_timestamps)
        self.history = None
        if num_targets is not None:
            self.history = self.lengths - torch.minimum(num_targets[order], self.lengths)
        self.max_seq_len, self.num_buckets = max_seq_len, num_buckets
        self._buckets = {}

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, L, ...] in sorted order, zeros after each user's end."""
        rows = t.new_zeros(self.batch_size * self.max_len, *t.shape[1:]).index_copy_(0, self.row, t)
        return rows.view(self.batch_size, self.max_len, *t.shape[1:])

    def tiles(self):
        """(s, e, c): query rows [s, e) of the c users longer than s."""
        longer = self.lengths.tolist()
        c = self.batch_size
        for s in range(0, self.max_len, TILE):
            while longer[c - 1] <= s:
                c -= 1
            yield s, min(s + TILE, self.max_len), c

    def time_buckets(self, s: int, e: int, c: int) -> torch.Tensor:
        """uint8 [c, e - s, e] time buckets of a tile: computed once (the log is the
        costly part) and kept for the backward, a quarter of a float bias."""
        if (s, c) not in self._buckets:
            target_ts, ts = self.target_ts[:c, s:e, None], self.ts[:c, None, :e]
            dtype = torch.uint8 if self.num_buckets < 256 else torch.int64
            self._buckets[s, c] = time_buckets(target_ts, ts, self.num_buckets).to(dtype)
        return self._buckets[s, c]

    def bias_index(self, s: int, e: int, c: int):
        """Position indices of query rows [s, e) x keys [0, e) of the first c users
        and the mask of that tile (None: plain causal), as ([e - s, e], None) or
        ([c, e - s, e], [c, e - s, e]) with targets."""
        N = self.max_seq_len
        i = torch.arange(s, e).unsqueeze(1)
        j = torch.arange(e).unsqueeze(0)
        if self.history is None:
            return (N - 1 + j - i).clamp_(0, 2 * N - 2), None
        history = self.history[:c, None, None]
        # Candidates sit at the history's end (see the reference) and see the history and themselves.
        rel = N - 1 + torch.minimum(j, history) - torch.minimum(i, history)
        mask = (j == i) | ((j < i) & (j < history))
        return rel.clamp_(0, 2 * N - 2), mask


_UPPER = torch.ones(TILE, TILE, dtype=torch.bool).triu_(1)


def _tile_scores(q, k, batch, position_weights, time_weights, s, e, c):
    """Scores q_i . k_j + rab(i, j) of one tile [c, H, e - s, e], its indices and mask."""
    (rel, mask), bucket = batch.bias_index(s, e, c), batch.time_buckets(s, e, c).long()
    bias = position_weights[rel].to(q.dtype) + time_weights[bucket].to(q.dtype)
    scores = torch.matmul(q[:c, :, s:e], k[:c, :, :e].transpose(-1, -2)).add_(bias.unsqueeze(1))
    return scores, rel, bucket, mask


def _apply_mask(t: torch.Tensor, s: int, e: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the masked entries of a tile in place; without targets only the diagonal block has any."""
    if mask is None:
        t[..., s:].masked_fill_(_UPPER[: e - s, : e - s], 0)
    else:
        t.mul_(mask.unsqueeze(1))
    return t


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, position_weights, time_weights, batch, normalizer):
        H, dv = v.shape[1:]
        qp, kp, vp = (batch.pad(t).transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, L, d]
        out = vp.new_zeros(batch.batch_size, H, batch.max_len, dv)
        for s, e, c in batch.tiles():
            scores, _, _, mask = _tile_scores(qp, kp, batch, position_weights, time_weights, s, e, c)
            weights = _apply_mask(torch.nn.functional.silu(scores, inplace=True), s, e, mask)
            out[:c, :, s:e] = weights @ vp[:c, :, :e]
        ctx.save_for_backward(qp, kp, vp, position_weights, time_weights)
        ctx.batch, ctx.normalizer = batch, normalizer
        return out.div_(normalizer).transpose(1, 2).flatten(0, 1)[batch.row]

    @staticmethod
    def backward(ctx, grad_out):
        qp, kp, vp, position_weights, time_weights = ctx.saved_tensors
        batch = ctx.batch
        grad_outp = batch.pad(grad_out / ctx.normalizer).transpose(1, 2).contiguous()
        grad_q, grad_k, grad_v = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
        grad_position = torch.zeros_like(position_weights)
        grad_time = torch.zeros_like(time_weights)
        for s, e, c in batch.tiles():
            scores, rel, bucket, mask = _tile_scores(qp, kp, batch, position_weights, time_weights, s, e, c)
            sig = torch.sigmoid(scores)
            weights = _apply_mask(scores * sig, s, e, mask)
            go = grad_outp[:c, :, s:e]
            grad_v[:c, :, :e] += weights.transpose(-1, -2) @ go
            # SiLU'(x) = sig * (1 + x - SiLU(x)); scores becomes dL/dscores in place.
            grad_weights = go @ vp[:c, :, :e].transpose(-1, -2)
            grad_scores = _apply_mask(scores.sub_(weights).add_(1).mul_(sig).mul_(grad_weights), s, e, mask)
            grad_q[:c, :, s:e] = grad_scores @ kp[:c, :, :e]
            grad_k[:c, :, :e] += grad_scores.transpose(-1, -2) @ qp[:c, :, s:e]
            grad_bias = grad_scores.sum(1, dtype=grad_time.dtype)  # the bias is shared by the heads
            grad_time.index_add_(0, bucket.flatten(), grad_bias.flatten())
            if rel.dim() == 2:
                grad_bias = grad_bias.sum(0)
            grad_position.index_add_(0, rel.flatten(), grad_bias.flatten())

        def unpad(t):
            return t.transpose(1, 2).flatten(0, 1)[batch.row]

        return unpad(grad_q), unpad(grad_k), unpad(grad_v), grad_position, grad_time, None, None


def hstu_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    target_timestamps: torch.Tensor,
    position_weights: torch.Tensor,
    time_weights: torch.Tensor,
    max_seq_len: int,
    normalizer: float,
    num_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same arguments and result as hstu_attention_reference; differentiable in
    q, k, v, position_weights and time_weights."""
    num_buckets = time_weights.numel() - 1
    batch = _Batch(offsets, timestamps, target_timestamps, num_targets, q.size(0), max_seq_len, num_buckets)
    return _HSTUAttention.apply(q, k, v, position_weights, time_weights, batch, normalizer)
