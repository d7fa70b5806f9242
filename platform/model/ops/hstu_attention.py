"""The HSTU attention core, Eq. (2) of Zhai et al. (ICML 2024):

    A(X) V(X) = phi2(Q K^T + rab^{p,t}) V,   phi2 = SiLU, scaled by 1/N

This is the plain-PyTorch reference: it materialises the [B, H, L, L] scores and
takes the [B, L, L] bias. The fused versions beside it compute the bias inside
from the two bias tables and are tested against this one.
"""

import torch
import torch.nn.functional as F

from ..jagged import jagged_to_padded, padded_index, padded_to_jagged


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rab: torch.Tensor,
    offsets: torch.Tensor,
    max_seq_len: int,
) -> torch.Tensor:
    """Causal pointwise (softmax-free) attention over a jagged batch.

    Args:
        q, k: [T, H, dqk] jagged queries and keys.
        v: [T, H, dv] jagged values.
        rab: [B, L, L] relative attention bias, shared by all heads; L is the
            batch's longest sequence, rab[b, i, j] is the bias of query i on key j.
        offsets: [B+1] sequence boundaries of the jagged tensors.
        max_seq_len: N, the model's fixed maximum length, used as the normaliser.

    Returns:
        [T, H, dv]: out[i] = sum_{j <= i} SiLU(q_i . k_j + rab[i, j]) v_j / N,
        per user and head. There is no softmax and no 1/sqrt(d): the weights are
        not normalised over keys, so the output keeps the intensity of the
        user's engagement (paper, Sec. 3.1). Dividing by the fixed N rather than
        the user's own length keeps that intensity comparable across users.
    """
    padded_length = rab.size(-1)
    index = padded_index(offsets, q.size(0), padded_length)
    # Pad to the batch's longest sequence only; [B, L, H, d] -> [B, H, L, d].
    q, k, v = (jagged_to_padded(t, offsets, padded_length, index=index).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)).add_(rab.unsqueeze(1))  # in place: [B, H, L, L] is the big tensor
    # Causal mask including the diagonal. It also hides every padded key from
    # every real query (padding only comes after a user's last real token).
    weights = F.silu(scores).tril_()
    out = (weights @ v) / max_seq_len
    return padded_to_jagged(out.transpose(1, 2), offsets, index)


ATTENTION_IMPLS = ("auto", "pytorch", "cpu", "triton")


def resolve_attention_impl(impl: str, x: torch.Tensor) -> str:
    """auto: the Triton kernel on CUDA tensors, the tiled `cpu` path on CPU (faster than this
    plain version at every length measured, and smaller; see the README's benchmarks).
    `pytorch` stays the plain version, the one every fused path is tested against."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda else "cpu"
    return impl


def fused_attention(impl: str):
    """The fused op (same signature as hstu_attention_reference) behind a name."""
    if impl == "cpu":
        from .hstu_attention_cpu import hstu_attention_cpu

        return hstu_attention_cpu
    if impl == "triton":
        from .hstu_attention_triton import hstu_attention_triton  # imports triton: only when asked for

        return hstu_attention_triton
    raise ValueError(f"no fused attention named {impl!r}")
