"""HSTU, the Hierarchical Sequential Transduction Unit of Zhai et al., "Actions
Speak Louder than Words" (ICML 2024, arXiv 2402.17152), as in the paper's
public code (the version behind its MovieLens/Books tables). One layer is

    Eq. (1)  U(X), V(X), Q(X), K(X) = Split(phi1(f1(X)))
    Eq. (2)  A(X) V(X) = phi2(Q(X) K(X)^T + rab^{p,t}) V(X)
    Eq. (3)  Y(X) = f2(Norm(A(X) V(X)) * U(X))

with phi1 = phi2 = SiLU, X pre-normalised, a residual connection around the
layer and no feed-forward block. Everything runs on jagged [T, D] tensors.
rab^{p,t} is genrec.model.relative_bias; how Eq. (2) runs (plain, tiled CPU,
Triton) is chosen once, when the stack is built, and is at the end of this file.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder_config import EncoderConfig
from .jagged import max_length
from .ops.hstu_attention import ATTENTION_IMPLS, hstu_attention
from .ops.hstu_attention_cpu import AttentionPlan, hstu_attention_cpu
from .relative_bias import RelativeBucketedTimeAndPositionBias, relative_bias_index
from .sasrec import causal_softmax_attention

LAYER_NORM_EPS = 1e-6


class HSTULayer(nn.Module):
    """Eq. (1)-(3) on a pre-normalised input (LayerNorm without affine), with a
    residual connection. dropout acts on the gated attention output before f2.
    config.attention / config.relative_bias select the paper's ablations."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        H, dqk, dv, D = config.num_heads, config.head_qk_dim, config.head_v_dim, config.dim
        self.num_heads, self.qk_dim, self.v_dim = H, dqk, dv
        self.num_positions, self.normalizer, self.attention = config.num_positions, config.normalizer, config.attention
        self.uvqk = nn.Linear(D, 2 * H * (dv + dqk), bias=False)  # f1
        self.rab = None if config.relative_bias == "none" else \
            RelativeBucketedTimeAndPositionBias(config.num_positions, terms=config.relative_bias)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(H * dv, D)  # f2
        nn.init.normal_(self.uvqk.weight, mean=0.0, std=0.02)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x: torch.Tensor, batch: "PaddedAttention | TiledCPUAttention | TritonAttention") -> torch.Tensor:
        """x [T, D] jagged -> [T, D]. batch: the batch's attention inputs (`HSTU.batch_attention`)."""
        u, q, k, v = self.project(x)  # Eq. (1)
        attended = batch.attend(self, q, k, v)  # Eq. (2): pointwise causal attention with rab, scaled by 1/N
        return self.output(x, u, attended)  # Eq. (3)

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
        SiLU(.)/N, and rab with one term or none (bias_index None)."""
        rab = None if self.rab is None else self.rab(bias_index)
        if self.attention == "softmax":
            return causal_softmax_attention(q, k, v, offsets, bias=rab)
        if rab is None:
            L = max_length(offsets)
            rab = q.new_zeros(offsets.numel() - 1, L, L)
        return hstu_attention(q, k, v, rab, offsets, self.normalizer)


class HSTU(nn.Module):
    """A stack of HSTU layers over a jagged batch. Its attention implementation is
    chosen here, once (config.attention_impl): the fused ops implement the full model
    only, so every ablation runs the plain path."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if config.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {config.attention_impl!r}")
        self.num_positions, self.is_paper_hstu = config.num_positions, config.is_paper_hstu
        self.attention_impl = config.attention_impl if config.is_paper_hstu else "pytorch"
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_blocks))

    def forward(
        self, x: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor, target_timestamps: torch.Tensor
    ) -> torch.Tensor:
        """x [T, D], offsets [B+1], timestamps and target_timestamps [T] -> [T, D]."""
        batch = self.batch_attention(offsets, timestamps, target_timestamps)
        for layer in self.layers:
            x = layer(x, batch)
        return x

    def batch_attention(self, offsets: torch.Tensor, timestamps: torch.Tensor, target_timestamps: torch.Tensor):
        """What Eq. (2) needs of the batch besides q, k, v, for the implementation chosen at
        construction. It depends on the batch only, so it is computed once and shared by every
        layer. "auto" follows the weights: a model is built on the CPU and may move to a GPU after."""
        impl = self.attention_impl
        if impl == "auto":
            impl = "triton" if self.layers[0].uvqk.weight.is_cuda else "cpu"
        if impl == "pytorch":
            return PaddedAttention(offsets, timestamps, target_timestamps, self.num_positions,
                                   uses_bias=self.layers[0].rab is not None)
        if impl == "cpu":
            return TiledCPUAttention(offsets, timestamps, target_timestamps, self.num_positions,
                                     self.layers[0].rab.num_time_buckets)
        return TritonAttention(offsets, timestamps, target_timestamps)


# ----------------------------------------------------------------------------- Eq. (2), per implementation
# Each holds one batch's inputs and runs a layer's attention on them: attend(layer, q, k, v) -> [T, H, dv].


class PaddedAttention:
    """The plain path (and every ablation): the batch's [B, L, L] bias index, gathered per layer."""

    def __init__(self, offsets, timestamps, target_timestamps, num_positions: int, uses_bias: bool = True) -> None:
        self.offsets = offsets
        self.bias_index = relative_bias_index(timestamps, target_timestamps, offsets, max_length(offsets),
                                              num_positions) if uses_bias else None

    def attend(self, layer: HSTULayer, q, k, v) -> torch.Tensor:
        return layer.plain_attention(q, k, v, self.offsets, self.bias_index)


class TiledCPUAttention:
    """The tiled CPU op (ops/hstu_attention_cpu.py) with the batch's `AttentionPlan`."""

    def __init__(self, offsets, timestamps, target_timestamps, num_positions: int, num_time_buckets: int) -> None:
        self.inputs = (offsets, timestamps, target_timestamps)
        self.plan = AttentionPlan(offsets, timestamps, target_timestamps, num_positions, num_time_buckets)

    def attend(self, layer: HSTULayer, q, k, v) -> torch.Tensor:
        return hstu_attention_cpu(q, k, v, *self.inputs, layer.rab.position_weights, layer.rab.time_weights,
                                  layer.num_positions, layer.normalizer, plan=self.plan)


class TritonAttention:
    """The Triton kernels, which compute the bias from the timestamps themselves."""

    def __init__(self, offsets, timestamps, target_timestamps) -> None:
        from .ops.hstu_attention_triton import hstu_attention_triton  # imports triton: only where it runs

        self.kernel, self.inputs = hstu_attention_triton, (offsets, timestamps, target_timestamps)

    def attend(self, layer: HSTULayer, q, k, v) -> torch.Tensor:
        return self.kernel(q, k, v, *self.inputs, layer.rab.position_weights, layer.rab.time_weights,
                           layer.num_positions, layer.normalizer)
