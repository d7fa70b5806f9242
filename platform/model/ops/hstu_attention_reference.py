"""HSTU attention with the relative bias computed from its tables: the plain
PyTorch reference of the fused versions (hstu_attention_cpu, hstu_attention_triton).

    out_i = sum_j mask(i, j) * SiLU(q_i . k_j + rab(i, j)) v_j / normalizer

per user and head, with rab(i, j) = position_weights[rel(i, j)] + time_weights[bucket(i, j)]
shared by all heads:

    rel(i, j)    = clamp(N - 1 + p(j) - p(i), 0, 2N - 2)
    bucket(i, j) = clamp(floor(ln(max(|target_ts[i] - ts[j]|, 1)) / 0.301), 0, len(time_weights) - 1)

Without targets p(i) = i and mask(i, j) = j <= i (causal, diagonal included). With
m = num_targets[b] M-FALCON candidates at the end of a sequence of n tokens, the
candidates see the n - m history tokens and themselves only, and all share the
position p = n - m (the one right after the history): each candidate then gets
exactly the attention it would get alone after the history. The clamp of rel only
matters for sequences longer than N.

This one pads the batch to its longest sequence and materialises [B, H, L, L]
scores: simple and obviously right, not fast.
"""

import torch
import torch.nn.functional as F

TIME_BUCKET_LOG_WIDTH = 0.301  # buckets of ln(seconds): each is e^0.301 ~ 1.35x wider than the last


def time_buckets(target_ts: torch.Tensor, ts: torch.Tensor, max_bucket: int) -> torch.Tensor:
    """Broadcast bucket of |target_ts - ts| (int64 Unix seconds) as int64.

    The gap is exact in int64 and rounded once to float32; every implementation
    must take these same steps so that gaps near a bucket edge land alike.
    ln(gap) >= 0, so truncating to long is the floor. (In place: [B, L, L] is large.)
    """
    gap = (target_ts - ts).abs_().float()
    return gap.clamp_(min=1).log_().div_(TIME_BUCKET_LOG_WIDTH).clamp_(max=max_bucket).long()


def hstu_attention_reference(
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
    """q, k [T, H, dqk], v [T, H, dv] jagged by offsets [B+1]; timestamps and
    target_timestamps [T] int64; position_weights [2N-1] (N = max_seq_len);
    time_weights [num_buckets + 1]; num_targets [B] or None -> [T, H, dv]."""
    num_tokens, device = q.size(0), q.device
    lengths = offsets.diff()
    batch_size = lengths.numel()
    L = int(lengths.max()) if batch_size else 0
    user = torch.arange(batch_size, device=device).repeat_interleave(lengths, output_size=num_tokens)
    pos = torch.arange(num_tokens, device=device) - offsets[:-1][user]

    def pad(t: torch.Tensor) -> torch.Tensor:  # [T, ...] -> [B, L, ...], differentiable
        return t.new_zeros(batch_size, L, *t.shape[1:]).index_put((user, pos), t)

    qp, kp, vp, ts, target_ts = (pad(t) for t in (q, k, v, timestamps, target_timestamps))
    history = lengths if num_targets is None else lengths - torch.minimum(num_targets, lengths)
    i = torch.arange(L, device=device)
    p = torch.minimum(i.unsqueeze(0), history.unsqueeze(1))  # [B, L]
    rel = (max_seq_len - 1 + p.unsqueeze(1) - p.unsqueeze(2)).clamp(0, 2 * max_seq_len - 2)
    bucket = time_buckets(target_ts.unsqueeze(2), ts.unsqueeze(1), time_weights.numel() - 1)
    rab = position_weights[rel] + time_weights[bucket]  # [B, L, L]
    ii, jj = i.view(1, L, 1), i.view(1, 1, L)
    mask = (jj == ii) | ((jj < ii) & (jj < history.view(-1, 1, 1)))  # padded keys are never < a real i

    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) + rab.unsqueeze(1).to(q.dtype)
    weights = F.silu(scores) * mask.unsqueeze(1)
    out = torch.einsum("bhij,bjhd->bihd", weights, vp) / normalizer
    return out[user, pos]
