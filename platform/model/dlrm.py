"""A DLRM-style pointwise ranker, the baseline generative ranking is measured against.

It sees what GR sees (genrec.model.generative), as features rather than through HSTU: for a
candidate item e (an item token of the interleaved batch, at its target time t) and the user's
earlier impressions j (item Phi_j, action a_j, time t_j),

    h_j      = item(Phi_j) + action(a_j) + age(bucket(t - t_j))   (HSTU's log-time buckets)
    interest = sum_j DIN(e, h_j) h_j                               (DIN's attention unit, no softmax)
    logits   = MLP([e, interest, e * interest, context, age(bucket(t - t_last)), age(bucket(t - t_first))])

context = mean of the user's context-token embeddings; t_last / t_first are the times of the most
recent and the first earlier impression (GR's relative time bias sees the same gaps; neither model
sees clock or calendar time). Every item token is one pointwise example that sees only impressions
strictly before it (never its own action), so a whole sequence trains in one pass without changing
what each example sees.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .embeddings import init_table
from .generative import GenerativeConfig, TokenTypes
from .jagged import jagged_to_padded, max_length, padded_index
from .relative_bias import NUM_TIME_BUCKETS, time_buckets

MLP_HIDDEN = 200
ATTENTION_HIDDEN = 32  # the DIN unit's one hidden layer


class DINAttention(nn.Module):
    """DIN's activation unit (Zhou et al., KDD 2018, Sec. 4.3): the weight of history item h for target
    t is w(t, h) = MLP([t, h, t - h, t * h]) (one PReLU hidden layer), and the user's interest in t is
    sum_j w(t, h_j) h_j, without a softmax (the paper keeps the intensity of the interest).

    Each target i has its own history h_ij (an item's age depends on the target's time). The first
    layer is linear in h for a fixed target,
        W [t, h, t - h, t * h] = (W_t + W_d) t + (W_h - W_d + W_p diag(t)) h,
    so it is one [hidden, D] x [D, L] product per target, never a [B, Q, L, 4D] input."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(4 * dim, hidden)
        self.activation = nn.PReLU()
        self.out = nn.Linear(hidden, 1)

    def forward(self, targets: torch.Tensor, history: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """targets [B, Q, D], history [B, Q, L, D] (item j as target q sees it), visible (bool,
        broadcastable to [B, Q, L]) -> interest [B, Q, D]."""
        w_t, w_h, w_d, w_p = self.hidden.weight.split(targets.size(-1), dim=1)  # [hidden, D] each
        per_target = targets @ (w_t + w_d).T + self.hidden.bias  # [B, Q, hidden]
        slope = (w_h - w_d) + w_p * targets.unsqueeze(-2)  # [B, Q, hidden, D]
        z = per_target.unsqueeze(-1) + slope @ history.transpose(-1, -2)  # [B, Q, hidden, L]
        weights = (self.out.weight @ self.activation(z)).squeeze(-2) + self.out.bias  # [B, Q, L]
        return ((weights * visible).unsqueeze(-2) @ history).squeeze(-2)


class DLRMRanker(nn.Module):
    retrieval = False

    def __init__(self, config: GenerativeConfig, hidden: int = MLP_HIDDEN,
                 attention_hidden: int = ATTENTION_HIDDEN) -> None:
        super().__init__()
        D = config.encoder.dim
        self.config, self.types = config, TokenTypes(*config.token_types)
        self.task_names = [name for name, _ in config.tasks]
        self.binary = torch.tensor([kind == "binary" for _, kind in config.tasks])
        self.items = nn.Embedding(config.encoder.num_items + 1, D, padding_idx=0)
        self.actions = nn.Embedding(config.num_actions, D)
        self.context = nn.Embedding(config.num_context + 1, D)
        self.ages = nn.Embedding(NUM_TIME_BUCKETS + 1, D)
        self.attention = DINAttention(D, attention_hidden)
        self.mlp = nn.Sequential(nn.Linear(6 * D, hidden), nn.ReLU(), nn.Dropout(config.encoder.dropout),
                                 nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, len(config.tasks)))
        for table in (self.items, self.actions, self.context, self.ages):
            init_table(table.weight)

    def action_embeddings(self, actions: torch.Tensor) -> torch.Tensor:
        if not self.config.multi_hot_actions:
            return self.actions(actions)
        bits = (actions.unsqueeze(-1) >> torch.arange(self.config.num_actions, device=actions.device)) & 1
        return bits.to(self.actions.weight.dtype) @ self.actions.weight

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.where(self.binary.to(logits.device), torch.sigmoid(logits), logits)

    def forward(self, ids: torch.Tensor, token_types: torch.Tensor, timestamps: torch.Tensor,
                target_timestamps: torch.Tensor, offsets: torch.Tensor,
                scored: torch.Tensor | None = None) -> tuple[None, torch.Tensor]:
        """The GR batch signature -> (no retrieval output, task logits [T, num_tasks] at item tokens).
        scored: [T] bool, the item tokens whose logits are wanted (default every item token; the rest stay
        zero). Each one is a query over its user's earlier impressions, so an evaluation that ranks one
        token per row pays for one query, not for every position of the row."""
        kind, num_tokens, num_users = token_types.long(), ids.size(0), offsets.numel() - 1
        user = torch.arange(num_users, device=ids.device).repeat_interleave(offsets.diff(), output_size=num_tokens)
        # the items alone, padded [B, L]; an item's action is the token right after it (none for the last;
        # a sequence never starts with an action, so the next user's first token is never taken for one)
        at = torch.nonzero(kind == self.types.item).squeeze(1)
        after = (at + 1).clamp(max=num_tokens - 1)
        has_action = (at + 1 < num_tokens) & (kind[after] == self.types.action)
        item_offsets = torch.cat([offsets[:1], torch.bincount(user[at], minlength=num_users).cumsum(0)])
        L = max_length(item_offsets)
        index = padded_index(item_offsets, at.numel(), L)
        impression = jagged_to_padded(self.items(ids[at]) + torch.where(has_action.unsqueeze(1), self.action_embeddings(
            torch.where(has_action, ids[after], 0)), 0.0), item_offsets, L, 0.0, index)  # [B, L, D]
        ts = jagged_to_padded(timestamps[at], item_offsets, L, 0, index)
        queries = torch.ones_like(at, dtype=torch.bool) if scored is None else scored[at]
        slot = index[queries]  # each query's (user, position) in the padded layout
        row, position = slot // L, slot % L
        ages = time_buckets(target_timestamps[at[queries]].unsqueeze(1), ts[row], NUM_TIME_BUCKETS)  # [Q, L]
        earlier = torch.arange(L, device=ids.device).unsqueeze(0) < position.unsqueeze(1)  # j < i: never padding
        candidate = self.items(ids[at[queries]])  # [Q, D]
        history = impression[row] + self.ages(ages)  # [Q, L, D]: each impression aged at its query's time
        interest = self.attention(candidate.unsqueeze(0), history.unsqueeze(0), earlier.unsqueeze(0)).squeeze(0)
        # the target's own time features: its gaps to the most recent and to the first earlier impression
        has_history = (position > 0).unsqueeze(1)
        since_last = self.ages(ages.gather(1, (position - 1).clamp(min=0).unsqueeze(1)).squeeze(1)) * has_history
        since_first = self.ages(ages[:, 0]) * has_history
        features = torch.cat([candidate, interest, candidate * interest,
                              self.user_context(ids, kind, user, num_users)[row], since_last, since_first], -1)
        logits = self.mlp(features)
        return None, logits.new_zeros(num_tokens, logits.size(1)).index_copy(0, at[queries], logits)

    def user_context(self, ids: torch.Tensor, kind: torch.Tensor, user: torch.Tensor, num_users: int) -> torch.Tensor:
        """[B, D]: the mean of each user's context-token embeddings (zero without context)."""
        is_context = kind == self.types.context
        context = self.context.weight.new_zeros(num_users, self.context.embedding_dim).index_add_(
            0, user[is_context], self.context(ids[is_context]))
        return context / torch.bincount(user[is_context], minlength=num_users).clamp(min=1).unsqueeze(1)
