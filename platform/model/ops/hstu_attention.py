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
    normalizer: float,
) -> torch.Tensor:
    """Causal pointwise (softmax-free) attention over a jagged batch.

    Args:
        q, k: [T, H, dqk] jagged queries and keys.
        v: [T, H, dv] jagged values.
        rab: [B, L, L] relative attention bias, shared by all heads; L is the
            batch's longest sequence, rab[b, i, j] is the bias of query i on key j.
        offsets: [B+1] sequence boundaries of the jagged tensors.
        normalizer: N of the 1/N, the model's fixed maximum length (or the
            configured attention_normalizer), not the user's own length.

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
    out = (weights @ v) / normalizer
    return padded_to_jagged(out.transpose(1, 2), offsets, index)


# Chosen once, when the model is built (genrec.model.hstu.HSTU): "pytorch" is this plain
# version, the one every fused path is tested against; "cpu" the tiled CPU op; "triton" the
# kernels; "auto" the fused op of the device the model's weights are on.
ATTENTION_IMPLS = ("auto", "pytorch", "cpu", "triton")
