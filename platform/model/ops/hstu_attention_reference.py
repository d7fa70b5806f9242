"""HSTU attention with the relative bias computed from its tables: the plain
PyTorch reference of the fused versions (hstu_attention_cpu, hstu_attention_triton).

    out_i = sum_j mask(i, j) * SiLU(q_i . k_j + rab(i, j)) v_j / normalizer

per user and head, with rab(i, j) the relative bias of genrec.model.relative_bias at
positions p(i), p(j). Without targets p(i) = i and mask(i, j) = j <= i (causal, diagonal included). With
m = num_targets[b] M-FALCON candidates at the end of a sequence of n tokens, the
candidates see the n - m history tokens and themselves only, and all share the
position p = n - m (the one right after the history): each candidate then gets
exactly the attention it would get alone after the history.

This one pads the batch to its longest sequence and materialises [B, H, L, L]
scores: simple and obviously right, not fast.
"""

import torch
import torch.nn.functional as F

from ..relative_bias import bias_table, bias_table_index


def hstu_attention_reference(
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
    """q, k [T, H, dqk], v [T, H, dv] jagged by offsets [B+1]; timestamps and
    target_timestamps [T] int64; position_weights [2N-1] (N = num_positions);
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
    index = bias_table_index(p.unsqueeze(2), p.unsqueeze(1), target_ts.unsqueeze(2), ts.unsqueeze(1), num_positions,
                             time_weights.numel() - 1)
    rab = bias_table(position_weights, time_weights)[index]  # [B, L, L]
    ii, jj = i.view(1, L, 1), i.view(1, 1, L)
    mask = (jj == ii) | ((jj < ii) & (jj < history.view(-1, 1, 1)))  # padded keys are never < a real i

    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) + rab.unsqueeze(1).to(q.dtype)
    weights = F.silu(scores) * mask.unsqueeze(1)
    out = torch.einsum("bhij,bjhd->bihd", weights, vp) / normalizer
    return out[user, pos]
