"""Input embeddings of a jagged item sequence: the item table (shared with the
output side, see `encoder.SequentialEncoder.item_embeddings`) plus a learned
absolute position embedding, as in the paper's public code."""

import math

import torch
import torch.nn as nn

from .jagged import positions_in_sequence


def init_table(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """An id table's starting rows (items, actions, context, ...), in place: truncated normal, std 0.02
    within two std, as the reference code starts them. Rows a table gains later start the same way
    (genrec.model.growth)."""
    return nn.init.trunc_normal_(weight, std=0.02, a=-0.04, b=0.04, generator=generator)


class SequenceEmbedding(nn.Module):
    """x_t = item_emb(id_t) * sqrt(D) + pos_emb(t), then dropout; t counts from
    0 within each user's (already truncated) sequence."""

    def __init__(
        self,
        num_items: int,
        num_positions: int,
        dim: int,
        dropout: float = 0.0,
        position_init: str = "xavier_normal",
    ) -> None:
        """num_items: V, ids are 1..V and row 0 is padding.
        position_init: "xavier_normal" (the reference HSTU re-initialises its
        position table so) or "truncated_normal" (std 1/sqrt(D), the reference
        SASRec)."""
        super().__init__()
        self.dim = dim
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.positions = nn.Embedding(num_positions, dim)
        self.dropout = nn.Dropout(dropout)
        init_table(self.items.weight)
        with torch.no_grad():
            self.items.weight[0].zero_()
        if position_init == "xavier_normal":
            nn.init.xavier_normal_(self.positions.weight)
        elif position_init == "truncated_normal":
            std = 1.0 / math.sqrt(dim)
            nn.init.trunc_normal_(self.positions.weight, std=std, a=-2 * std, b=2 * std)
        else:
            raise ValueError(f"unknown position_init {position_init!r}")

    def forward(self, item_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """item_ids [T] jagged (no padding), offsets [B+1] -> [T, D]."""
        positions = positions_in_sequence(offsets, item_ids.size(0))
        return self.dropout(self.items(item_ids) * math.sqrt(self.dim) + self.positions(positions))
