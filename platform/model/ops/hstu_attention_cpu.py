"""HSTU attention on CPU without the [B, L, L] bias or the masked upper half:
same signature and numbers as hstu_attention_reference (see there for the math).

Users are sorted by length, longest first, and padded to [B, L, H, d]. Query
tiles [s, e) then only involve the users longer than s (a prefix of the sorted
batch) and the keys [0, e): the cost follows the real jagged lengths at tile
granularity, the way Stochastic Length expects (on ML-1M batches about a quarter
of the padded [B, L, L] square).

Everything that depends only on the batch is an `AttentionPlan`, built once per
forward pass and shared by all layers: the sorted layout, the tiles, and for each
tile one int32 index per (query, key) into the flattened [buckets, 2N - 1] table of
(time bucket, relative position) bias sums. Masked pairs (the upper triangle, and
with M-FALCON targets what a candidate may not see) index one extra entry that
holds a huge negative number: SiLU of it is exactly 0 and so is SiLU's derivative,
so the mask costs nothing per layer. Per tile and head the forward is one baddbmm
(bias + Q K^T), one SiLU and one bmm with V; 1/N is applied to the [T, H, dv]
output. The backward is hand-written: it reuses the forward's scores and weights
(recomputes them when they would exceed SAVED_SCORES_LIMIT elements), takes
SiLU' in one fused op and scatters the bias gradient into the table once per tile.
"""

from __future__ import annotations

import torch

from ..relative_bias import bias_table, bias_table_index

SAVED_SCORES_LIMIT = 1 << 25  # score elements per layer kept for the backward (x2 tensors, 128 MB each in float32)


def tile_rows(max_len: int) -> int:
    """Query rows per tile: smaller tiles skip more of the masked and padded area, larger ones make
    fewer, larger matmuls (the fastest of 16-128 on this project's AMD EPYC: 32 at N=200, 64 at 1024, 128 at 4096)."""
    return 32 if max_len <= 512 else 64 if max_len <= 2048 else 128


class AttentionPlan:
    """The batch's sorted padded layout, its tiles and their bias indices (no gradients).

    tiles: (s, e, c, index): query rows [s, e) of the c users longer than s against
    keys [0, e); index [c, e - s, e] int32 into the flattened [num_buckets + 1, 2N - 1]
    table, or `self.hidden` (= the table's size) where the pair is masked.
    """

    def __init__(self, offsets: torch.Tensor, timestamps: torch.Tensor, target_timestamps: torch.Tensor,
                 num_positions: int, num_buckets: int, num_targets: torch.Tensor | None = None) -> None:
        num_tokens = timestamps.size(0)
        lengths = offsets.diff()
        self.lengths, order = lengths.sort(descending=True, stable=True)
        self.batch_size = lengths.numel()
        self.max_len = int(self.lengths[0]) if self.batch_size else 0
        self.num_buckets, self.num_positions = num_buckets, num_positions
        rank = torch.empty_like(order)
        rank[order] = torch.arange(self.batch_size)
        user = torch.arange(self.batch_size).repeat_interleave(lengths, output_size=num_tokens)
        pos = torch.arange(num_tokens) - offsets[:-1][user]
        self.row = rank[user] * self.max_len + pos  # token -> row of the flattened sorted [B * L] layout
        ts, target_ts = self.pad(timestamps), self.pad(target_timestamps)
        history = None if num_targets is None else self.lengths - torch.minimum(num_targets[order], self.lengths)
        self.hidden = (num_buckets + 1) * (2 * num_positions - 1)
        self.tiles = []
        longer, c = self.lengths.tolist(), self.batch_size
        tile = tile_rows(self.max_len)
        for s in range(0, self.max_len, tile):
            while longer[c - 1] <= s:
                c -= 1
            e = min(s + tile, self.max_len)
            i, j = torch.arange(s, e).unsqueeze(1), torch.arange(e).unsqueeze(0)
            if history is None:
                query, key, visible = i, j, j <= i
            else:  # candidates sit at the history's end (see the reference) and see the history and themselves
                h = history[:c, None, None]
                query, key = torch.minimum(i, h), torch.minimum(j, h)
                visible = (j == i) | ((j < i) & (j < h))
            index = bias_table_index(query, key, target_ts[:c, s:e, None], ts[:c, None, :e], num_positions, num_buckets)
            index = index.masked_fill_(~visible, self.hidden)
            self.tiles.append((s, e, c, index.to(torch.int32)))
        self.area = sum(index.numel() for *_, index in self.tiles)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, L, ...] in sorted order, zeros after each user's end."""
        # index_copy_ from a strided source (q, k, v are column slices of one projection) is 3x slower
        t = t.contiguous()
        rows = t.new_zeros(self.batch_size * self.max_len, *t.shape[1:]).index_copy_(0, self.row, t)
        return rows.view(self.batch_size, self.max_len, *t.shape[1:])

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...]."""
        return t.flatten(0, 1).index_select(0, self.row)

    def table(self, position_weights: torch.Tensor, time_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Flattened [num_buckets + 1, 2N - 1] table of every (time bucket, relative position) bias, then the
        masked pairs' entry: a negative number so large that SiLU and its derivative are exactly 0 there (and
        adding q.k to it cannot overflow)."""
        table = bias_table(position_weights, time_weights).to(dtype)
        return torch.cat([table, table.new_full((1,), torch.finfo(dtype).min / 2)])


def _bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, index.flatten()).view(index.shape)


def _scores(qp, kp, bias, h, s, e, c):
    """bias + q_i . k_j of one tile and head: [c, e - s, e]."""
    return torch.baddbmm(bias, qp[:c, s:e, h], kp[:c, :e, h].transpose(1, 2))


def _forward(qp, kp, vp, table, plan, keep: bool):
    """Padded [B, L, H, dv] output (not yet divided by the normaliser) and, if `keep`, every
    tile's (scores, weights) per head."""
    H = vp.size(2)
    out = vp.new_empty(vp.shape)  # every real row is written; padding rows are never read
    kept = []
    for s, e, c, index in plan.tiles:
        bias = _bias(table, index)
        for h in range(H):
            scores = _scores(qp, kp, bias, h, s, e, c)
            if keep:
                weights = torch.nn.functional.silu(scores)
                kept += [scores, weights]
            else:
                weights = torch.nn.functional.silu(scores, inplace=True)
            out[:c, s:e, h] = torch.bmm(weights, vp[:c, :e, h])
    return out, kept


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, position_weights, time_weights, plan, normalizer):
        qp, kp, vp = (plan.pad(t) for t in (q, k, v))
        table = plan.table(position_weights, time_weights, q.dtype)
        keep = plan.area * q.size(1) <= SAVED_SCORES_LIMIT
        out, kept = _forward(qp, kp, vp, table, plan, keep)
        ctx.save_for_backward(qp, kp, vp, table, *kept)
        ctx.plan, ctx.normalizer, ctx.table_dtype = plan, normalizer, position_weights.dtype
        return plan.unpad(out).div_(normalizer)

    @staticmethod
    def backward(ctx, grad_out):
        qp, kp, vp, table, *kept = ctx.saved_tensors
        plan, H = ctx.plan, qp.size(2)
        go = plan.pad(grad_out / ctx.normalizer)
        grad_q, grad_k, grad_v = torch.empty_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
        grad_table = torch.zeros(table.numel(), dtype=ctx.table_dtype)
        saved, kept = bool(kept), iter(kept)
        for s, e, c, index in plan.tiles:
            bias = None if saved else _bias(table, index)
            grad_bias = None
            for h in range(H):
                if saved:
                    scores, weights = next(kept), next(kept)
                else:
                    scores = _scores(qp, kp, bias, h, s, e, c)
                    weights = torch.nn.functional.silu(scores)
                q_, k_, v_, go_ = qp[:c, s:e, h], kp[:c, :e, h], vp[:c, :e, h], go[:c, s:e, h]
                grad_v[:c, :e, h] += torch.bmm(weights.transpose(1, 2), go_)
                # SiLU'(x) in one op; 0 at the masked pairs, as SiLU is flat there (see AttentionPlan.table)
                grad_scores = torch.ops.aten.silu_backward(torch.bmm(go_, v_.transpose(1, 2)), scores)
                grad_q[:c, s:e, h] = torch.bmm(grad_scores, k_)
                grad_k[:c, :e, h] += torch.bmm(grad_scores.transpose(1, 2), q_)
                grad_bias = grad_scores if grad_bias is None else grad_bias.add_(grad_scores)
            grad_table.index_add_(0, index.flatten(), grad_bias.flatten().to(grad_table.dtype))
        grad_table = grad_table[:-1].view(plan.num_buckets + 1, 2 * plan.num_positions - 1)
        return (plan.unpad(grad_q), plan.unpad(grad_k), plan.unpad(grad_v), grad_table.sum(0), grad_table.sum(1),
                None, None)


def hstu_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    target_timestamps: torch.Tensor,
    position_weights: torch.Tensor,
    time_weights: torch.Tensor,
    num_positions: int,
    normalizer: float,
    num_targets: torch.Tensor | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Same arguments and result as hstu_attention_reference; differentiable in
    q, k, v, position_weights and time_weights. `plan`, the `AttentionPlan` of this
    batch (offsets, timestamps, num_targets), saves rebuilding it in every layer."""
    if plan is None:
        plan = AttentionPlan(offsets, timestamps, target_timestamps, num_positions, time_weights.numel() - 1,
                             num_targets)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, position_weights, time_weights)):
        return _HSTUAttention.apply(q, k, v, position_weights, time_weights, plan, normalizer)
    # Inference: the same forward, SiLU in place and nothing kept for a backward.
    out, _ = _forward(*(plan.pad(t) for t in (q, k, v)), plan.table(position_weights, time_weights, q.dtype),
                      plan, keep=False)
    return plan.unpad(out).div_(normalizer)
