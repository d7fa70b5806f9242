"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM
2018), the baseline of the HSTU paper's tables, block for block as in the
paper's public code: softmax causal self-attention whose query is the
normalised input and whose keys/values are the raw input, then a point-wise
ReLU feed-forward network. Same jagged interface as `HSTU`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder_config import EncoderConfig
from .jagged import jagged_to_padded, max_length, padded_index, padded_to_jagged

LAYER_NORM_EPS = 1e-8


def causal_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    dropout_p: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product causal attention over a jagged batch.

    q, k, v: [T, H, d] jagged; returns [T, H, d]. bias: an optional [B, L, L]
    additive bias shared by all heads (HSTU's softmax ablation with rab), L the
    batch's longest sequence. Pads to that length; the causal mask alone keeps
    real queries off the padded keys.
    """
    padded_length = max_length(offsets)
    index = padded_index(offsets, q.size(0), padded_length)
    q, k, v = (jagged_to_padded(t, offsets, padded_length, index=index).transpose(1, 2) for t in (q, k, v))
    if bias is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    else:
        future = torch.ones(padded_length, padded_length, dtype=torch.bool, device=q.device).triu_(1)
        mask = bias.masked_fill(future, -torch.inf).unsqueeze(1).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return padded_to_jagged(out.transpose(1, 2), offsets, index)


class SASRecBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(dim, 3 * dim)  # query, key, value (as torch.nn.MultiheadAttention)
        self.out_proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, dim),
            nn.Dropout(dropout),
        )
        # The reference re-initialises every weight matrix with xavier_normal_;
        # attention biases start at zero, FFN biases keep the default init.
        for linear in (self.in_proj, self.out_proj, self.ffn[0], self.ffn[3]):
            nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [T, D] jagged -> [T, D]."""
        T, D = x.shape
        H = self.num_heads
        normed_x = F.layer_norm(x, (D,), eps=LAYER_NORM_EPS)
        # SASRec normalises only the query side: Q from LN(x), K and V from x.
        q = F.linear(normed_x, self.in_proj.weight[:D], self.in_proj.bias[:D])
        k, v = F.linear(x, self.in_proj.weight[D:], self.in_proj.bias[D:]).chunk(2, dim=-1)
        attended = causal_softmax_attention(
            q.reshape(T, H, D // H),
            k.reshape(T, H, D // H),
            v.reshape(T, H, D // H),
            offsets,
            dropout_p=self.dropout if self.training else 0.0,
        ).reshape(T, D)
        h = F.layer_norm(normed_x + self.out_proj(attended), (D,), eps=LAYER_NORM_EPS)
        return h + self.ffn(h)


class SASRec(nn.Module):
    """A stack of SASRec blocks; takes (and ignores) timestamps to share HSTU's interface."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        self.layers = nn.ModuleList(
            SASRecBlock(c.dim, c.num_heads, c.ffn_dim or c.dim, c.dropout) for _ in range(c.num_blocks)
        )

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        target_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, D], offsets [B+1] -> [T, D]."""
        for layer in self.layers:
            x = layer(x, offsets)
        return x
