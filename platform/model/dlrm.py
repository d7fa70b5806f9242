"""A DLRM-style pointwise ranker, the baseline generative ranking is measured against.

For a candidate item e (an item token of the interleaved batch) and the user's earlier
impressions h_j = item(Phi_j) + action(a_j):

    interest = sum_j softmax_j(<W_q e, W_k h_j> / sqrt(D)) h_j      (DIN-like target attention)
    logits   = MLP([e, interest, e * interest, context])             (one output per task)

context = mean of the user's context-token embeddings. Every item token is one pointwise
example that sees only impressions strictly before it (never its own action), so a whole
sequence trains in one pass without changing what each example sees.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .generative import ACTION, CONTEXT, ITEM, GenerativeConfig
from .jagged import jagged_to_padded, max_length, padded_index, padded_to_jagged


class DLRMRanker(nn.Module):
    retrieval = False

    def __init__(self, config: GenerativeConfig, hidden: int = 200) -> None:
        super().__init__()
        D = config.encoder.dim
        self.config = config
        self.task_names = [name for name, _ in config.tasks]
        self.binary = torch.tensor([kind == "binary" for _, kind in config.tasks])
        self.items = nn.Embedding(config.encoder.num_items + 1, D, padding_idx=0)
        self.actions = nn.Embedding(config.num_actions, D)
        self.context = nn.Embedding(config.num_context + 1, D)
        self.query = nn.Linear(D, D, bias=False)
        self.key = nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(4 * D, hidden), nn.ReLU(), nn.Dropout(config.encoder.dropout),
                                 nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, len(config.tasks)))
        for table in (self.items, self.actions, self.context):
            nn.init.trunc_normal_(table.weight, std=0.02, a=-0.04, b=0.04)

    def action_embeddings(self, actions: torch.Tensor) -> torch.Tensor:
        if not self.config.multi_hot_actions:
            return self.actions(actions)
        bits = (actions.unsqueeze(-1) >> torch.arange(self.config.num_actions, device=actions.device)) & 1
        return bits.to(self.actions.weight.dtype) @ self.actions.weight

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.where(self.binary.to(logits.device), torch.sigmoid(logits), logits)

    def forward(self, ids: torch.Tensor, token_types: torch.Tensor, timestamps: torch.Tensor,
                target_timestamps: torch.Tensor, offsets: torch.Tensor) -> tuple[None, torch.Tensor]:
        """The GR batch signature -> (no retrieval output, task logits [T, num_tasks], meaningful at item tokens)."""
        L = max_length(offsets)
        index = padded_index(offsets, ids.size(0), L)
        kind = jagged_to_padded(token_types.long(), offsets, L, -1, index)  # [B, L], -1 = padding
        tok = jagged_to_padded(ids, offsets, L, 0, index)
        is_item = kind == ITEM
        item = self.items(torch.where(is_item, tok, 0))  # [B, L, D]
        next_tok = torch.cat([tok[:, 1:], torch.zeros_like(tok[:, :1])], 1)  # the action after each item
        has_action = torch.cat([kind[:, 1:] == ACTION, torch.zeros_like(is_item[:, :1])], 1)
        history = item + torch.where((is_item & has_action).unsqueeze(-1),
                                     self.action_embeddings(torch.where(has_action, next_tok, 0)), 0.0)
        is_context = kind == CONTEXT
        context = (self.context(torch.where(is_context, tok, 0)) * is_context.unsqueeze(-1)).sum(1)
        context = context / is_context.sum(1, keepdim=True).clamp(min=1)
        scores = self.query(item) @ self.key(history).transpose(1, 2) / math.sqrt(item.size(-1))  # [B, L, L]
        earlier = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril(-1)
        visible = earlier & (is_item & has_action).unsqueeze(1)
        weights = torch.softmax(scores.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)  # no history: zero
        interest = weights @ history
        features = torch.cat([item, interest, item * interest, context.unsqueeze(1).expand_as(item)], -1)
        return None, padded_to_jagged(self.mlp(features), offsets, index)
