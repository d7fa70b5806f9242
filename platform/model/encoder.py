"""A sequential recommender: jagged item sequence -> one L2-normalised user
vector per position, scored against the same (L2-normalised) item table."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import SequenceEmbedding
from .encoder_config import EncoderConfig
from .hstu import HSTU
from .sasrec import SASRec

L2_NORM_EPS = 1e-6


class SequentialEncoder(nn.Module):
    def __init__(self, embedding: SequenceEmbedding, blocks: nn.Module, config: EncoderConfig) -> None:
        """blocks: `HSTU` or `SASRec` (anything taking
        (x [T, D], offsets, timestamps, target_timestamps) -> [T, D])."""
        super().__init__()
        self.embedding = embedding
        self.blocks = blocks
        self.config = config

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


def build_encoder(config: EncoderConfig) -> SequentialEncoder:
    """The encoder `config` describes (see `EncoderConfig` for the recipes).
    Its dropout rate is used for the input embedding and inside every block."""
    if config.kind == "hstu":
        blocks, position_init = HSTU(config), "xavier_normal"
    elif config.kind == "sasrec":
        blocks, position_init = SASRec(config), "truncated_normal"
    else:
        raise ValueError(f"unknown encoder kind {config.kind!r}; expected 'hstu' or 'sasrec'")
    embedding = SequenceEmbedding(config.num_items, config.num_positions, config.dim, config.dropout, position_init)
    return SequentialEncoder(embedding, blocks, config)
