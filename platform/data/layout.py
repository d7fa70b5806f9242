"""The interleaved token layout of the generative-recommender setting, defined once:

    c_1 .. c_k, Phi_0, a_0, Phi_1, a_1, ..., Phi_{n-1}, a_{n-1} [, Phi_n]

contextual tokens (user features) at the first event's time, then each event as its
item token and its action token (both at the event's time), then optionally one more
item alone (its action is what ranking predicts). Training batches
(genrec.data.batches) and serving's histories (genrec.serve.model) are built by
`interleave`; the model learns the token-type ids through its GenerativeConfig
(genrec.model imports nothing of the data layer), from `TOKEN_TYPES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .jagged import concat_ranges, offsets_from_lengths

CONTEXT, ITEM, ACTION = 0, 1, 2  # token_types ids
TOKEN_TYPES = (CONTEXT, ITEM, ACTION)  # in the order genrec.model.generative.TokenTypes takes them
NO_ACTION = -1  # target_actions where a token's action is not a target


@dataclass(frozen=True)
class InterleavedTokens:
    """B users' jagged tokens (ids [T] in each token kind's own vocabulary, token_types [T] int8,
    timestamps [T], offsets [B+1]) and where the events landed: item_positions and
    action_positions [P] (event order), last_positions [B] (the trailing items; empty without)."""

    ids: np.ndarray
    token_types: np.ndarray
    timestamps: np.ndarray
    offsets: np.ndarray
    item_positions: np.ndarray
    action_positions: np.ndarray
    last_positions: np.ndarray


def interleave(context_ids: np.ndarray, items: np.ndarray, actions: np.ndarray, timestamps: np.ndarray,
               events: np.ndarray, last_items: np.ndarray | None = None,
               last_timestamps: np.ndarray | None = None) -> InterleavedTokens:
    """context_ids [B, k] (already shifted into the shared context vocabulary); items, actions,
    timestamps [P]: every user's events, user after user, events [B] of them per user (at least
    one each); last_items and last_timestamps [B]: one trailing item per user, or None."""
    b, c = context_ids.shape
    trailing = last_items is not None
    offsets = offsets_from_lengths(c + 2 * events + int(trailing))
    total, base = int(offsets[-1]), offsets[:-1]
    ids = np.zeros(total, np.int64)
    types = np.full(total, CONTEXT, np.int8)
    ts = np.zeros(total, np.int64)
    context_positions = (base[:, None] + np.arange(c)).ravel()
    ids[context_positions] = context_ids.ravel()
    first_ts = timestamps[offsets_from_lengths(events)[:-1]] if b else np.zeros(0, np.int64)
    ts[context_positions] = np.repeat(first_ts, c)
    # the k-th event of a user sits at base + c + 2k (item) and base + c + 2k + 1 (action)
    item_positions = np.repeat(base + c, events) + 2 * concat_ranges(np.zeros(b), events)
    action_positions = item_positions + 1
    ids[item_positions], types[item_positions], ts[item_positions] = items, ITEM, timestamps
    ids[action_positions], types[action_positions], ts[action_positions] = actions, ACTION, timestamps
    last_positions = offsets[1:] - 1 if trailing else np.zeros(0, np.int64)
    if trailing:
        ids[last_positions], types[last_positions], ts[last_positions] = last_items, ITEM, last_timestamps
    return InterleavedTokens(ids, types, ts, offsets, item_positions, action_positions, last_positions)
