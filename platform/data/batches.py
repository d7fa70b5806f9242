"""The batch builder: rows of a sequence table -> jagged numpy arrays for the model.

Both token layouts of ARCHITECTURE.md come from the same sequence table:

- "items" (the paper's public MovieLens protocol): tokens are items; position i
  predicts the next item. Keys: item_ids, timestamps, target_ids,
  target_timestamps, offsets, users.
- "interleaved" (generative-recommender setting): contextual tokens first, then
  Phi_0, a_0, Phi_1, a_1, ...; at an item position the target is that item's
  action (ranking, `target_actions`), at an action position the next item
  (retrieval, `target_ids`). Extra keys: token_types (0 context, 1 item, 2 action),
  target_values (the ranked event's value, e.g. its rating; NaN where none);
  item_ids then holds each token's id in its own vocabulary.

Jagged means values of length T = sum of lengths plus `offsets` (B+1); nothing is
padded. The most recent `max_seq_len` items are kept. Rows with `eval_start`
(valid/test) mark as targets only the positions that predict an item at index
>= eval_start; training rows mark every position.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .jagged import concat_ranges, offsets_from_lengths

CONTEXT, ITEM, ACTION = 0, 1, 2
NO_ACTION = -1


def _lists(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    column = table[name].combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    return column.values.to_numpy(), offsets


def stochastic_length(lengths: np.ndarray, max_seq_len: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic Length (paper, Sec. 3.3): how many of its most recent items each user keeps.

    A user with n > N^(alpha/2) items is cut to N^(alpha/2) with probability 1 - N^alpha / n^2,
    so the expected attention cost stays O(N^alpha) per user.
    """
    target = int(max_seq_len ** (alpha / 2))
    n = lengths.astype(np.float64)
    p_cut = np.where(n > target, 1.0 - max_seq_len**alpha / np.maximum(n, 1) ** 2, 0.0)
    return np.where(rng.random(len(n)) < p_cut, target, lengths)


def build_batch(
    table: pa.Table,
    layout: str = "items",
    max_seq_len: int = 200,
    context_columns: tuple[str, ...] = (),
    context_offsets: tuple[int, ...] = (),
    stochastic_alpha: float | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Build one jagged batch from sequence-table rows (see module doc)."""
    items, offsets = _lists(table, "items")
    stamps, _ = _lists(table, "timestamps")
    actions, _ = _lists(table, "actions")
    n = np.diff(offsets)
    if "eval_start" in table.column_names:
        eval_start = table["eval_start"].to_numpy().astype(np.int64)
    else:
        eval_start = np.zeros(len(n), dtype=np.int64)  # training: every item is a target
    # Predicting item k needs items < k as input: at most n-1 inputs, and at most N of them.
    inputs = np.minimum(n - 1, max_seq_len)
    if stochastic_alpha is not None:
        inputs = np.minimum(inputs, stochastic_length(inputs, max_seq_len, stochastic_alpha, rng or np.random.default_rng()))
    keep = inputs > 0
    n, offsets0, eval_start, inputs = n[keep], offsets[:-1][keep], eval_start[keep], inputs[keep]
    users = table["user"].to_numpy()[keep].astype(np.int64)
    first = offsets0 + n - 1 - inputs  # index of the first input item of each user
    src = concat_ranges(first, inputs)  # input token k of a user -> flat index of its item
    nxt = src + 1  # what it predicts
    local_src = src - np.repeat(offsets0, inputs)  # index of the input item within its user
    is_target = local_src + 1 >= np.repeat(eval_start, inputs)
    if layout == "items":
        return {
            "item_ids": items[src].astype(np.int64),
            "timestamps": stamps[src].astype(np.int64),
            "target_ids": np.where(is_target, items[nxt], 0).astype(np.int64),
            "target_timestamps": stamps[nxt].astype(np.int64),
            "offsets": offsets_from_lengths(inputs),
            "users": users,
        }
    if layout == "interleaved":
        ranked = local_src >= np.repeat(eval_start, inputs)  # item tokens whose action is a target
        return _interleave(table, keep, users, items, stamps, actions, src, nxt, is_target, ranked, inputs,
                           context_columns, context_offsets)
    raise ValueError(f"unknown layout {layout!r}; expected 'items' or 'interleaved'")


def _interleave(table, keep, users, items, stamps, actions, src, nxt, is_target, ranked, inputs, context_columns, context_offsets):
    """Context tokens, then (item, action) pairs, then the last item alone (its action is to be predicted)."""
    b = len(users)
    c = len(context_columns)
    # per user: c context tokens, 2 tokens per input item, then the next item (whose action is a target)
    lengths = c + 2 * inputs + 1
    offsets = offsets_from_lengths(lengths)
    total = int(offsets[-1])
    ids = np.zeros(total, np.int64)
    types = np.zeros(total, np.int8)
    ts = np.zeros(total, np.int64)
    target_ts = np.zeros(total, np.int64)
    target_ids = np.zeros(total, np.int64)
    target_actions = np.full(total, NO_ACTION, np.int64)

    base = offsets[:-1]
    input_starts = offsets_from_lengths(inputs)[:-1]
    first_ts = stamps[src[input_starts]] if b else np.zeros(0, np.int64)
    for f, (name, shift) in enumerate(zip(context_columns, context_offsets)):
        pos = base + f
        ids[pos] = table[name].to_numpy()[keep].astype(np.int64) + shift
        ts[pos] = first_ts
        target_ts[pos] = first_ts
    # k-th input of a user sits at base + c + 2k (item) and base + c + 2k + 1 (action)
    k = concat_ranges(np.zeros(b), inputs)
    item_pos = np.repeat(base + c, inputs) + 2 * k
    action_pos = item_pos + 1
    ids[item_pos], types[item_pos], ts[item_pos] = items[src], ITEM, stamps[src]
    ids[action_pos], types[action_pos], ts[action_pos] = actions[src], ACTION, stamps[src]
    target_ts[item_pos] = stamps[src]
    target_actions[item_pos] = np.where(ranked, actions[src], NO_ACTION)  # ranking: the action it received
    target_ts[action_pos] = stamps[nxt]
    target_ids[action_pos] = np.where(is_target, items[nxt], 0)  # retrieval: the next item
    last = offsets[1:] - 1
    last_src = nxt[np.cumsum(inputs) - 1]
    ids[last], types[last], ts[last], target_ts[last] = items[last_src], ITEM, stamps[last_src], stamps[last_src]
    target_actions[last] = actions[last_src]
    target_values = np.full(total, np.nan, np.float32)  # the event's value (e.g. a rating) where ranked, else NaN
    if "values" in table.column_names:
        values, _ = _lists(table, "values")
        target_values[item_pos] = np.where(ranked, values[src], np.nan)
        target_values[last] = values[last_src]
    return {
        "item_ids": ids,
        "token_types": types,
        "timestamps": ts,
        "target_ids": target_ids,
        "target_actions": target_actions,
        "target_values": target_values,
        "target_timestamps": target_ts,
        "offsets": offsets,
        "users": users,
    }


def context_offsets(manifest: dict, columns: list[str]) -> tuple[int, ...]:
    """Each context feature gets its own id range in one shared context vocabulary (0 = unknown)."""
    sizes = manifest["context_features"]
    shifts, at = [], 0
    for name in columns:
        shifts.append(at)
        at += sizes[name] + 1
    return tuple(shifts)
