"""A sequential recommender: jagged item sequence -> one L2-normalised user
vector per position, scored against the same (L2-normalised) item table."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import SequenceEmbedding
from .hstu import HSTU
from .sasrec import SASRec

L2_NORM_EPS = 1e-6


class SequentialEncoder(nn.Module):
    def __init__(self, embedding: SequenceEmbedding, blocks: nn.Module) -> None:
        """blocks: `HSTU` or `SASRec` (anything taking
        (x [T, D], offsets, timestamps, target_timestamps) -> [T, D])."""
        super().__init__()
        self.embedding = embedding
        self.blocks = blocks

    @property
    def num_items(self) -> int:
        return self.embedding.items.num_embeddings - 1

    def forward(
        self,
        item_ids: torch.Tensor,
        timestamps: torch.Tensor,
        target_timestamps: torch.Tensor,
        offsets: torch.Tensor,
    ) -> torch.Tensor:
        """Jagged batch -> [T, D] L2-normalised user vectors.

        item_ids [T] (1..V), timestamps [T] (Unix seconds), target_timestamps [T]
        (time of what each position predicts: ts[i+1], or the request time at a
        user's last position), offsets [B+1]. Output i depends on tokens <= i
        and on target_timestamps[i] only.
        """
        x = self.embedding(item_ids, offsets)
        x = self.blocks(x, offsets, timestamps, target_timestamps)
        return F.normalize(x, dim=-1, eps=L2_NORM_EPS)

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[...] ids -> [..., D] L2-normalised item vectors (the output side)."""
        return F.normalize(self.embedding.items(item_ids), dim=-1, eps=L2_NORM_EPS)

    def all_item_embeddings(self) -> torch.Tensor:
        """[V + 1, D] L2-normalised table, row = item id (row 0, padding, is zero):
        what the loss samples from and full-ranking evaluation scores against."""
        return F.normalize(self.embedding.items.weight, dim=-1, eps=L2_NORM_EPS)


def build_encoder(
    kind: str,
    num_items: int,
    max_seq_len: int,
    dim: int = 50,
    num_blocks: int = 2,
    num_heads: int = 1,
    qk_dim: int | None = None,
    v_dim: int | None = None,
    ffn_dim: int | None = None,
    dropout: float = 0.2,
) -> SequentialEncoder:
    """kind "hstu" or "sasrec". Defaults are the paper's MovieLens-1M recipes:
    HSTU D=50, 2 blocks, 1 head, dqk = dv = D / heads (so HSTU-large is
    num_blocks=8, num_heads=2); SASRec D=50, 2 blocks, 1 head, FFN width D.
    The dropout rate is used for the input embedding and inside every block."""
    if kind == "hstu":
        blocks = HSTU(
            dim,
            num_blocks,
            num_heads,
            qk_dim or dim // num_heads,
            v_dim or dim // num_heads,
            max_seq_len,
            dropout,
        )
        position_init = "xavier_normal"
    elif kind == "sasrec":
        blocks = SASRec(dim, num_blocks, num_heads, ffn_dim or dim, dropout)
        position_init = "truncated_normal"
    else:
        raise ValueError(f"unknown encoder kind {kind!r}; expected 'hstu' or 'sasrec'")
    embedding = SequenceEmbedding(num_items, max_seq_len, dim, dropout, position_init)
    return SequentialEncoder(embedding, blocks)
