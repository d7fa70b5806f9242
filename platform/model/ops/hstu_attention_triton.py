"""HSTU attention as Triton kernels (forward and backward): same signature and
numbers as hstu_attention_reference (see there for the math).

The relative bias is computed inside the kernels from the timestamps and the two
tables, never materialised: `_scores` is genrec.model.relative_bias's formula
(bias_table_index, time_buckets) in Triton, step for step. One program owns a (query tile, user, head) in the
forward and a (key tile, user, head) in the backward, and only visits the tiles on
or below the diagonal of its own user, so the cost follows the real jagged lengths.
The backward recomputes the scores; dq and the two table gradients are summed
with atomic adds (in fp32).

Imports triton at the top: import this module only where Triton is installed.
"""

import torch
import triton
import triton.language as tl

from ..relative_bias import TIME_BUCKET_LOG_WIDTH

BLOCK = 32  # query and key tile; tl.dot needs at least 16


@triton.jit
def _scores(q, k, offs_m, offs_n, n, history, target_ts, TS, PW, TW, num_positions, max_bucket,
            HAS_TARGETS: tl.constexpr, LOG_WIDTH: tl.constexpr):
    """q_i . k_j + rab(i, j) of one tile (fp32), the table indices and the mask."""
    ts = tl.load(TS + offs_n, mask=offs_n < n, other=0)
    gap = tl.abs(target_ts[:, None] - ts[None, :]).to(tl.float32)
    bucket = tl.floor(tl.math.div_rn(tl.log(tl.maximum(gap, 1.0)), LOG_WIDTH))
    bucket = tl.minimum(bucket, max_bucket).to(tl.int32)
    i, j = offs_m[:, None], offs_n[None, :]
    if HAS_TARGETS:  # candidates sit at the history's end and see the history and themselves
        rel = num_positions - 1 + tl.minimum(j, history) - tl.minimum(i, history)
    else:
        rel = num_positions - 1 + j - i
    rel = tl.minimum(tl.maximum(rel, 0), 2 * num_positions - 2)
    valid = ((j == i) | ((j < i) & (j < history))) & (j < n)
    s = tl.dot(q, tl.trans(k)) + tl.load(PW + rel) + tl.load(TW + bucket)
    return s, rel, bucket, valid


@triton.jit
def _forward(Q, K, V, Out, offsets, TS, TTS, PW, TW, num_targets,
             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
             num_positions, max_bucket, inv_normalizer,
             H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_TARGETS: tl.constexpr, LOG_WIDTH: tl.constexpr):
    start_m = tl.program_id(1) * BLOCK_M
    b, h = tl.program_id(0) // H, tl.program_id(0) % H
    start = tl.load(offsets + b)
    n = (tl.load(offsets + b + 1) - start).to(tl.int32)
    if start_m < n:
        history = n
        if HAS_TARGETS:
            history = n - tl.minimum(tl.load(num_targets + b).to(tl.int32), n)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_qk, offs_v = tl.arange(0, BLOCK_DQK), tl.arange(0, BLOCK_DV)
        rows = start + offs_m
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_qk[None, :],
                    mask=(offs_m[:, None] < n) & (offs_qk[None, :] < DQK), other=0.0)
        target_ts = tl.load(TTS + rows, mask=offs_m < n, other=0)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start_n in range(0, tl.minimum(n, start_m + BLOCK_M), BLOCK_N):  # the causal half only
            offs_n = start_n + tl.arange(0, BLOCK_N)
            cols = start + offs_n
            k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_qk[None, :],
                        mask=(offs_n[:, None] < n) & (offs_qk[None, :] < DQK), other=0.0)
            v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_v[None, :],
                        mask=(offs_n[:, None] < n) & (offs_v[None, :] < DV), other=0.0)
            s, rel, bucket, valid = _scores(q, k, offs_m, offs_n, n, history, target_ts, TS + start, PW, TW,
                                            num_positions, max_bucket, HAS_TARGETS, LOG_WIDTH)
            weights = tl.where(valid, s * tl.sigmoid(s), 0.0)
            acc += tl.dot(weights.to(v.dtype), v)
        tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + offs_v[None, :],
                 (acc * inv_normalizer).to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < n) & (offs_v[None, :] < DV))


@triton.jit
def _backward(Q, K, V, dOut, dQ, dK, dV, dPW, dTW, offsets, TS, TTS, PW, TW, num_targets,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
              stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
              num_positions, max_bucket, inv_normalizer,
              H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_TARGETS: tl.constexpr, LOG_WIDTH: tl.constexpr):
    start_n = tl.program_id(1) * BLOCK_N
    b, h = tl.program_id(0) // H, tl.program_id(0) % H
    start = tl.load(offsets + b)
    n = (tl.load(offsets + b + 1) - start).to(tl.int32)
    if start_n < n:
        history = n
        if HAS_TARGETS:
            history = n - tl.minimum(tl.load(num_targets + b).to(tl.int32), n)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_qk, offs_v = tl.arange(0, BLOCK_DQK), tl.arange(0, BLOCK_DV)
        cols = start + offs_n
        k_mask = (offs_n[:, None] < n) & (offs_qk[None, :] < DQK)
        v_mask = (offs_n[:, None] < n) & (offs_v[None, :] < DV)
        k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_qk[None, :], mask=k_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_v[None, :], mask=v_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for start_m in range(start_n // BLOCK_M * BLOCK_M, n, BLOCK_M):  # queries at or after the keys
            offs_m = start_m + tl.arange(0, BLOCK_M)
            rows = start + offs_m
            q_mask = (offs_m[:, None] < n) & (offs_qk[None, :] < DQK)
            q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_qk[None, :], mask=q_mask, other=0.0)
            do = tl.load(dOut + rows[:, None] * stride_dot + h * stride_doh + offs_v[None, :],
                         mask=(offs_m[:, None] < n) & (offs_v[None, :] < DV), other=0.0)
            target_ts = tl.load(TTS + rows, mask=offs_m < n, other=0)
            s, rel, bucket, valid = _scores(q, k, offs_m, offs_n, n, history, target_ts, TS + start, PW, TW,
                                            num_positions, max_bucket, HAS_TARGETS, LOG_WIDTH)
            sig = tl.sigmoid(s)
            weights = s * sig
            dv += tl.dot(tl.trans(tl.where(valid, weights, 0.0).to(do.dtype)), do)
            # SiLU'(s) = sig * (1 + s - SiLU(s))
            ds = tl.dot(do, tl.trans(v)) * (sig * (1.0 + s - weights)) * inv_normalizer
            ds = tl.where(valid, ds, 0.0)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            tl.atomic_add(dQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_qk[None, :],
                          tl.dot(ds.to(k.dtype), k), mask=q_mask)
            tl.atomic_add(dPW + rel, ds, mask=valid)
            tl.atomic_add(dTW + bucket, ds, mask=valid)
        tl.store(dK + cols[:, None] * stride_dkt + h * stride_dkh + offs_qk[None, :],
                 dk.to(dK.dtype.element_ty), mask=k_mask)
        tl.store(dV + cols[:, None] * stride_dvt + h * stride_dvh + offs_v[None, :],
                 (dv * inv_normalizer).to(dV.dtype.element_ty), mask=v_mask)


def _launch_args(q, v, offsets, num_targets, num_positions, time_weights, normalizer):
    lengths = offsets.diff()
    max_len = int(lengths.max()) if lengths.numel() else 0
    H, dqk, dv = q.size(1), q.size(2), v.size(2)
    # Users x heads on the first axis: CUDA allows 2^31 - 1 programs there, 65535 on the others.
    grid = (lengths.numel() * H, triton.cdiv(max_len, BLOCK))
    scalars = (num_positions, time_weights.numel() - 1, 1.0 / normalizer)
    meta = dict(H=H, DQK=dqk, DV=dv, BLOCK_DQK=max(16, triton.next_power_of_2(dqk)),
                BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_M=BLOCK, BLOCK_N=BLOCK,
                HAS_TARGETS=num_targets is not None, LOG_WIDTH=TIME_BUCKET_LOG_WIDTH)
    return grid, scalars, meta


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, position_weights, time_weights, offsets, timestamps, target_timestamps,
                num_targets, num_positions, normalizer):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        grid, scalars, meta = _launch_args(q, v, offsets, num_targets, num_positions, time_weights, normalizer)
        out = torch.empty_like(v)
        if grid[0] * grid[1] > 0:
            _forward[grid](q, k, v, out, offsets, timestamps, target_timestamps, position_weights, time_weights,
                           num_targets, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
                           *scalars, **meta)
        ctx.save_for_backward(q, k, v, position_weights, time_weights, offsets, timestamps, target_timestamps,
                              num_targets)
        ctx.num_positions, ctx.normalizer = num_positions, normalizer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, position_weights, time_weights, offsets, timestamps, target_timestamps, num_targets = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        grid, scalars, meta = _launch_args(q, v, offsets, num_targets, ctx.num_positions, time_weights, ctx.normalizer)
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # atomics: accumulate in fp32
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        grad_position = torch.zeros(position_weights.shape, dtype=torch.float32, device=q.device)
        grad_time = torch.zeros(time_weights.shape, dtype=torch.float32, device=q.device)
        if grid[0] * grid[1] > 0:
            _backward[grid](q, k, v, grad_out, grad_q, grad_k, grad_v, grad_position, grad_time, offsets, timestamps,
                            target_timestamps, position_weights, time_weights, num_targets,
                            *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *grad_out.stride()[:2],
                            *grad_q.stride()[:2], *grad_k.stride()[:2], *grad_v.stride()[:2], *scalars, **meta)
        return (grad_q.to(q.dtype), grad_k, grad_v, grad_position.to(position_weights.dtype),
                grad_time.to(time_weights.dtype), None, None, None, None, None, None)


def hstu_attention_triton(
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
) -> torch.Tensor:
    """Same arguments and result as hstu_attention_reference; differentiable in
    q, k, v, position_weights and time_weights. All tensors on one Triton device."""
    return _HSTUAttention.apply(q, k, v, position_weights, time_weights, offsets, timestamps, target_timestamps,
                                num_targets, num_positions, normalizer)
