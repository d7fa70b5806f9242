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

from .encoder_config import EncoderConfig
from .jagged import jagged_to_padded, max_length, padded_index
from .ops.hstu_attention import fused_attention, hstu_attention, resolve_attention_impl
from .ops.hstu_attention_cpu import AttentionPlan, hstu_attention_cpu
from .ops.hstu_attention_reference import time_buckets
from .ops.table_lookup import table_lookup
from .sasrec import causal_softmax_attention

LAYER_NORM_EPS = 1e-6
NUM_TIME_BUCKETS = 128


class HSTULayer(nn.Module):
    """Eq. (1)-(3) on a pre-normalised input (LayerNorm without affine), with a
    residual connection. dropout acts on the gated attention output before f2.
    config.attention / config.relative_bias select the paper's ablations."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        H, dqk, dv, D = config.num_heads, config.head_qk_dim, config.head_v_dim, config.dim
        self.num_heads, self.qk_dim, self.v_dim, self.normalizer = H, dqk, dv, config.normalizer
        self.max_seq_len, self.attention_impl = config.max_seq_len, config.attention_impl
        self.attention, self.is_paper_hstu = config.attention, config.is_paper_hstu
        self.uvqk = nn.Linear(D, 2 * H * (dv + dqk), bias=False)  # f1
        self.rab = None if config.relative_bias == "none" else \
            RelativeBucketedTimeAndPositionBias(config.max_seq_len, terms=config.relative_bias)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(H * dv, D)  # f2
        nn.init.normal_(self.uvqk.weight, mean=0.0, std=0.02)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, bias_index: torch.Tensor | AttentionPlan | None,
                timestamps: torch.Tensor | None = None, target_timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D] jagged -> [T, D]. bias_index is what `HSTU.attention_inputs` built for the
        batch: the plain attention's [B, L, L] index (`relative_bias_index`; None without rab),
        the tiled CPU path's `AttentionPlan`, or None for Triton, which computes the bias
        from the timestamps."""
        u, q, k, v = self.project(x)
        # Eq. (2): pointwise causal attention with the relative bias, scaled by 1/N.
        if isinstance(bias_index, AttentionPlan):
            attended = hstu_attention_cpu(q, k, v, offsets, timestamps, target_timestamps, self.rab.position_weights,
                                          self.rab.time_weights, self.max_seq_len, self.normalizer, plan=bias_index)
        elif not self.is_paper_hstu or bias_index is not None:
            attended = self.plain_attention(q, k, v, offsets, bias_index)
        else:
            fused = fused_attention(resolve_attention_impl(self.attention_impl, x))
            attended = fused(q, k, v, offsets, timestamps, target_timestamps, self.rab.position_weights,
                             self.rab.time_weights, self.max_seq_len, self.normalizer)
        return self.output(x, u, attended)

    def project(self, x: torch.Tensor):
        """Eq. (1) on the pre-normalised x [T, D] (LayerNorm without affine): one projection,
        SiLU over all of it, then split -> u [T, H*dv], q, k [T, H, dqk], v [T, H, dv]."""
        H, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        normed_x = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
        u, v, q, k = F.silu(self.uvqk(normed_x)).split([H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        return u, q.view(-1, H, dqk), k.view(-1, H, dqk), v.view(-1, H, dv)

    def output(self, x: torch.Tensor, u: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Eq. (3) and the residual: normalise A(X)V(X) [T, H, dv] (no affine), gate it with
        U(X), project back with f2."""
        attended = attended.flatten(1)
        gated = u * F.layer_norm(attended, attended.shape[-1:], eps=LAYER_NORM_EPS)
        return x + self.out(self.dropout(gated))

    def plain_attention(self, q, k, v, offsets, bias_index) -> torch.Tensor:
        """Eq. (2) on the materialised bias, or its ablations: softmax instead of
        SiLU(.)/N, and rab with one term or none."""
        rab = None if self.rab is None else self.rab(bias_index)
        if self.attention == "softmax":
            return causal_softmax_attention(q, k, v, offsets, bias=rab)
        if rab is None:
            L = max_length(offsets)
            rab = q.new_zeros(offsets.numel() - 1, L, L)
        return hstu_attention(q, k, v, rab, offsets, self.normalizer)


class HSTU(nn.Module):
    """A stack of HSTU layers over a jagged batch."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.max_seq_len, self.attention_impl = config.max_seq_len, config.attention_impl
        # The fused kernels implement the full model; the ablations run on the plain path.
        self.is_paper_hstu, self.uses_bias = config.is_paper_hstu, config.relative_bias != "none"
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_blocks))

    def forward(
        self, x: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor, target_timestamps: torch.Tensor
    ) -> torch.Tensor:
        """x [T, D], offsets [B+1], timestamps and target_timestamps [T] -> [T, D]."""
        bias_index = self.attention_inputs(x, offsets, timestamps, target_timestamps)
        for layer in self.layers:
            x = layer(x, offsets, bias_index, timestamps, target_timestamps)
        return x

    def attention_inputs(self, x, offsets, timestamps, target_timestamps) -> torch.Tensor | AttentionPlan | None:
        """What the attention needs of the batch besides q, k, v. It depends on the batch only
        (offsets, timestamps), so it is computed once here and shared by every layer."""
        impl = resolve_attention_impl(self.attention_impl, x) if self.is_paper_hstu else "pytorch"
        if impl == "cpu":
            return AttentionPlan(offsets, timestamps, target_timestamps, self.max_seq_len,
                                 self.layers[0].rab.time_weights.numel() - 1)
        if impl == "pytorch" and self.uses_bias:
            return relative_bias_index(timestamps, target_timestamps, offsets, max_length(offsets), self.max_seq_len)
        return None


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """rab^{p,t} of Eq. (2): a learned scalar per relative position (2N - 1 of
    them) plus one per log-bucketed time gap (129), shared by all heads.
    terms "position" or "time" keeps one of the two (the paper's ablations)."""

    def __init__(self, max_seq_len: int, num_time_buckets: int = NUM_TIME_BUCKETS, terms: str = "both") -> None:
        super().__init__()
        if terms not in ("both", "position", "time"):
            raise ValueError(f"relative bias terms must be 'both', 'position' or 'time', got {terms!r}")
        self.shape = (num_time_buckets + 1, 2 * max_seq_len - 1)
        self.position_weights = nn.Parameter(torch.empty(self.shape[1]).normal_(0, 0.02)) \
            if terms != "time" else None
        self.time_weights = nn.Parameter(torch.empty(self.shape[0]).normal_(0, 0.02)) \
            if terms != "position" else None

    def forward(self, bias_index: torch.Tensor) -> torch.Tensor:
        """bias_index [B, L, L] from `relative_bias_index` -> rab [B, L, L]."""
        # Every (time bucket, relative position) sum in one small table, so the
        # [B, L, L] bias is a single gather (and its backward a single scatter).
        table = torch.zeros(self.shape, device=bias_index.device)
        if self.time_weights is not None:
            table = table + self.time_weights.unsqueeze(1)
        if self.position_weights is not None:
            table = table + self.position_weights.unsqueeze(0)
        return table_lookup(table.reshape(-1), bias_index)


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
    each key happened.
    """
    index = padded_index(offsets, timestamps.size(0), padded_length)
    ts = jagged_to_padded(timestamps, offsets, padded_length, index=index)
    target_ts = jagged_to_padded(target_timestamps, offsets, padded_length, index=index)
    time_bucket = time_buckets(target_ts.unsqueeze(2), ts.unsqueeze(1), num_time_buckets)
    position = torch.arange(padded_length, device=offsets.device)
    relative_position = max_seq_len - 1 + position.unsqueeze(0) - position.unsqueeze(1)
    return time_bucket.mul_(2 * max_seq_len - 1).add_(relative_position)
