"""Generative ranking and retrieval in one causal HSTU (Zhai et al., ICML 2024, Sec. 2.2 and Fig. 2):

    c_1 .. c_k, Phi_0, a_0, Phi_1, a_1, ..., Phi_{n-1}, a_{n-1}, Phi_n

contextual tokens c (user features), then items Phi and the actions a taken on
them, interleaved. The hidden state at an item token Phi_i predicts the action
a_i (ranking; target-aware, since the candidate Phi_i is an input), the one at an
action token a_i predicts the next item Phi_{i+1} (retrieval). a_i comes after
Phi_i, so causal attention keeps an item's own action out of its own score.

A token embeds as  content * sqrt(D) + position + token type,  content being the
item table (shared with the retrieval output), the action table (a bitmask of
several actions embeds as the sum of their rows) or the context table. Which token_types
id is which kind is the data layer's (genrec.data.layout), passed in as `TokenTypes`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import init_table
from .encoder_config import EncoderConfig
from .hstu import HSTU, LAYER_NORM_EPS
from .jagged import positions_in_sequence

BINARY, REGRESSION = "binary", "regression"
L2_NORM_EPS = 1e-6


class TokenTypes(NamedTuple):
    """The token_types id of each kind of token (0, 1, 2 in some order: rows of the type table).
    The layout is defined on the data side (genrec.data.layout.TOKEN_TYPES); the model imports
    nothing of the data layer, so it is told."""

    context: int
    item: int
    action: int


@dataclass(frozen=True)
class GenerativeConfig:
    """encoder.num_positions counts tokens (context + 2 per history item + the candidate);
    tasks are (name, kind) pairs, kind "binary" (a logit, BCE) or "regression" (a value, MSE)."""

    encoder: EncoderConfig
    num_actions: int
    multi_hot_actions: bool  # action ids are bitmasks OR(1 << k) rather than indices
    num_context: int  # context ids are 1..num_context, 0 = unknown
    tasks: tuple[tuple[str, str], ...]
    token_types: TokenTypes

    def to_dict(self) -> dict:
        return asdict(self)


class GenerativeRecommender(nn.Module):
    retrieval = True  # also predicts the next item at action positions

    def __init__(self, config: GenerativeConfig) -> None:
        super().__init__()
        enc, D = config.encoder, config.encoder.dim
        self.config = config
        self.task_names = [name for name, _ in config.tasks]
        self.binary = torch.tensor([kind == BINARY for _, kind in config.tasks])
        self.items = nn.Embedding(enc.num_items + 1, D, padding_idx=0)
        self.actions = nn.Embedding(config.num_actions, D)
        self.context = nn.Embedding(config.num_context + 1, D)
        self.types = TokenTypes(*config.token_types)
        self.token_types = nn.Embedding(len(self.types), D)
        self.positions = nn.Embedding(enc.num_positions, D)
        self.dropout = nn.Dropout(enc.dropout)
        self.blocks = HSTU(enc)
        self.heads = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, len(config.tasks)))
        for table in (self.items, self.actions, self.context, self.token_types):
            init_table(table.weight)
        nn.init.xavier_normal_(self.positions.weight)
        with torch.no_grad():
            self.items.weight[0].zero_()

    @property
    def num_items(self) -> int:
        return self.items.num_embeddings - 1

    # ------------------------------------------------------------------ inputs

    def action_embeddings(self, actions: torch.Tensor) -> torch.Tensor:
        """[...] action ids (or bitmasks) -> [..., D]; a bitmask is the sum of its actions' rows."""
        if not self.config.multi_hot_actions:
            return self.actions(actions)
        bits = (actions.unsqueeze(-1) >> torch.arange(self.config.num_actions, device=actions.device)) & 1
        return bits.to(self.actions.weight.dtype) @ self.actions.weight

    def _embed(self, content: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        x = content * math.sqrt(content.size(-1)) + self.positions(positions) + self.token_types(token_types)
        return self.dropout(x)

    def token_embeddings(self, ids: torch.Tensor, token_types: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Jagged tokens -> x [T, D]. ids [T] hold each token's id in its own vocabulary
        (item 1..V, action id or bitmask, context 1..C), token_types [T] say which."""
        kind, types = token_types.long(), self.types
        zero = torch.zeros_like(ids)
        content = (torch.where((kind == types.item).unsqueeze(1),
                               self.items(torch.where(kind == types.item, ids, zero)), 0.0)
                   + torch.where((kind == types.action).unsqueeze(1),
                                 self.action_embeddings(torch.where(kind == types.action, ids, zero)), 0.0)
                   + torch.where((kind == types.context).unsqueeze(1),
                                 self.context(torch.where(kind == types.context, ids, zero)), 0.0))
        return self._embed(content, positions_in_sequence(offsets, ids.size(0)), kind)

    def candidate_embeddings(self, item_ids: torch.Tensor, position: int) -> torch.Tensor:
        """[m] item ids -> [m, D]: item tokens all placed at one position index (after a history of that length)."""
        if position >= self.positions.num_embeddings:
            raise ValueError(f"position {position} is beyond the {self.positions.num_embeddings} tokens the model "
                             "was built for")
        at = torch.full_like(item_ids, position)
        return self._embed(self.items(item_ids), at, torch.full_like(item_ids, self.types.item))

    def history_inputs(self, history: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One user's interleaved tokens (item_ids, token_types, timestamps) -> (x [n, D], timestamps [n])."""
        ids = history["item_ids"]
        offsets = torch.tensor([0, ids.size(0)], device=ids.device)
        return self.token_embeddings(ids, history["token_types"], offsets), history["timestamps"]

    # ------------------------------------------------------------------ outputs

    def task_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Heads on item positions: hidden [..., D] -> [..., num_tasks] (logits; raw values for regression)."""
        return self.heads(F.layer_norm(hidden, hidden.shape[-1:], eps=LAYER_NORM_EPS))

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> what a task predicts: a probability (binary tasks) or the value itself (regression)."""
        return torch.where(self.binary.to(logits.device), torch.sigmoid(logits), logits)

    def all_item_embeddings(self) -> torch.Tensor:
        """[V + 1, D] L2-normalised item table (retrieval output side; row 0, padding, is zero)."""
        return F.normalize(self.items.weight, dim=-1, eps=L2_NORM_EPS)

    def forward(self, ids: torch.Tensor, token_types: torch.Tensor, timestamps: torch.Tensor,
                target_timestamps: torch.Tensor, offsets: torch.Tensor,
                scored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Jagged interleaved batch -> (L2-normalised user vectors [T, D] for retrieval at action
        positions, task logits [T, num_tasks] for ranking at item positions). Output i depends on
        tokens <= i and on target_timestamps[i] (the time of what position i predicts) only.
        scored (the item tokens a caller reads, as the DLRM baseline takes it) changes nothing here:
        one causal pass computes every position at once."""
        hidden = self.blocks(self.token_embeddings(ids, token_types, offsets), offsets, timestamps, target_timestamps)
        return F.normalize(hidden, dim=-1, eps=L2_NORM_EPS), self.task_logits(hidden)

    @torch.no_grad()
    def rank(self, history: dict[str, torch.Tensor], candidate_ids: torch.Tensor, request_time: int) -> torch.Tensor:
        """The target-aware contract serving shares: [m] candidates -> per-task predictions [m, num_tasks],
        each candidate scored as if it alone were appended after the history (position n, the request
        time), so it sees the whole history and itself, never another candidate. Plain implementation:
        m sequences history + candidate in one jagged batch (M-FALCON in serving must match it)."""
        ids, types, ts = history["item_ids"], history["token_types"], history["timestamps"]
        n, m = ids.size(0), candidate_ids.size(0)
        if n >= self.positions.num_embeddings:
            raise ValueError(f"a history of {n} tokens leaves no position for the candidate: the model was built "
                             f"for {self.positions.num_embeddings} tokens (keep the most recent items)")
        now = ts.new_tensor([request_time])
        seq_ts = torch.cat([ts, now])
        target_ts = torch.cat([ts[1:], now, now])  # each token's target time: the next token's, then the request
        offsets = torch.arange(m + 1, device=ids.device) * (n + 1)
        _, logits = self(torch.cat([ids.expand(m, n), candidate_ids.unsqueeze(1)], 1).flatten(),
                         torch.cat([types.expand(m, n), types.new_full((m, 1), self.types.item)], 1).flatten(),
                         seq_ts.repeat(m), target_ts.repeat(m), offsets)
        return self.predictions(logits[offsets[1:] - 1])
