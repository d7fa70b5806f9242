"""The batch builder: rows of a sequence table -> jagged numpy arrays for the model.

Both token layouts of docs/ARCHITECTURE.md come from the same sequence table:

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
padded. The most recent `keep_items` items are kept. Rows with `eval_start`
(valid/test) mark as targets only the positions that predict an item at index
>= eval_start; training rows mark every position. Evaluation goes through
`target_windows` first, so that a row with more targets than `keep_items` loses none.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .jagged import concat_ranges, offsets_from_lengths
from .layout import ACTION, CONTEXT, ITEM, NO_ACTION, interleave  # noqa: F401 (CONTEXT, ITEM, ACTION: re-exported)
from .sequences import slice_lists


def _lists(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    column = table[name].combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    return column.values.to_numpy(), offsets


def stochastic_length(lengths: np.ndarray, keep_items: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic Length (paper, Sec. 3.3): how many of its most recent items each user keeps.
    N is keep_items, the most a batch keeps of a user.

    A user with n > N^(alpha/2) items is cut to N^(alpha/2) with probability 1 - N^alpha / n^2,
    so the expected attention cost stays O(N^alpha) per user.
    """
    target = int(keep_items ** (alpha / 2))
    n = lengths.astype(np.float64)
    p_cut = np.where(n > target, 1.0 - keep_items**alpha / np.maximum(n, 1) ** 2, 0.0)
    return np.where(rng.random(len(n)) < p_cut, target, lengths)


def build_batch(
    table: pa.Table,
    layout: str = "items",
    keep_items: int = 200,
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
    inputs = np.minimum(n - 1, keep_items)
    if stochastic_alpha is not None:
        inputs = np.minimum(inputs, stochastic_length(inputs, keep_items, stochastic_alpha, rng or np.random.default_rng()))
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
    """The interleaved layout (genrec.data.layout): context tokens, then (item, action) pairs,
    then the last item alone (its action is to be predicted); then each token's targets."""
    context = [table[name].to_numpy()[keep].astype(np.int64) + shift
               for name, shift in zip(context_columns, context_offsets)]
    context_ids = np.stack(context, axis=1) if context else np.zeros((len(users), 0), np.int64)
    last_src = nxt[np.cumsum(inputs) - 1]
    tokens = interleave(context_ids, items[src], actions[src], stamps[src], inputs, items[last_src], stamps[last_src])
    total, item_pos, action_pos, last = len(tokens.ids), tokens.item_positions, tokens.action_positions, tokens.last_positions
    target_ts = tokens.timestamps.copy()  # context and item tokens: their own time
    target_ts[action_pos] = stamps[nxt]
    target_ids = np.zeros(total, np.int64)
    target_ids[action_pos] = np.where(is_target, items[nxt], 0)  # retrieval: the next item
    target_actions = np.full(total, NO_ACTION, np.int64)
    target_actions[item_pos] = np.where(ranked, actions[src], NO_ACTION)  # ranking: the action it received
    target_actions[last] = actions[last_src]
    target_values = np.full(total, np.nan, np.float32)  # the event's value (e.g. a rating) where ranked, else NaN
    if "values" in table.column_names:
        values, _ = _lists(table, "values")
        target_values[item_pos] = np.where(ranked, values[src], np.nan)
        target_values[last] = values[last_src]
    return {
        "item_ids": tokens.ids,
        "token_types": tokens.token_types,
        "timestamps": tokens.timestamps,
        "target_ids": target_ids,
        "target_actions": target_actions,
        "target_values": target_values,
        "target_timestamps": target_ts,
        "offsets": tokens.offsets,
        "users": users,
    }


def count_targets(table: pa.Table) -> int:
    """Evaluation targets of rows with `eval_start`: every event at index >= eval_start that has an
    earlier event of its user (a user's very first event has no history to predict it from)."""
    lengths = np.diff(table["items"].combine_chunks().offsets.to_numpy())
    return int((lengths - np.maximum(table["eval_start"].to_numpy(), 1)).clip(min=0).sum())


def target_windows(table: pa.Table, keep_items: int) -> pa.Table:
    """Evaluation rows -> rows that score every target k (see count_targets) from its user's
    min(k, keep_items) most recent events, as a leave-one-out target is scored.

    build_batch keeps only a row's last keep_items inputs, so a row with more targets than that
    (a time split, a one-pass window) would lose its earlier ones. Here the targets k <= keep_items
    of a user share one row (its first keep_items + 1 events: causal attention gives each target
    exactly the events before it), and each later target gets its own row, events
    [k - keep_items, k]. Rows stay in user order, each user's rows in time order.
    """
    n = np.diff(table["items"].combine_chunks().offsets.to_numpy()).astype(np.int64)
    first = np.maximum(table["eval_start"].to_numpy().astype(np.int64), 1)
    rows = np.arange(len(n))
    early = first <= np.minimum(n - 1, keep_items)  # has a target k <= keep_items
    late_first = np.maximum(first, keep_items + 1)
    late_count = (n - late_first).clip(min=0)
    late_rows = np.repeat(rows, late_count)
    late_k = concat_ranges(late_first, late_count)
    all_rows = np.concatenate([rows[early], late_rows])
    starts = np.concatenate([np.zeros(int(early.sum()), np.int64), late_k - keep_items])
    stops = np.concatenate([np.minimum(n, keep_items + 1)[early], late_k + 1])
    eval_start = np.concatenate([first[early], np.full(len(late_k), keep_items, np.int64)])
    order = np.lexsort((stops, all_rows))
    windows = slice_lists(table.drop_columns(["eval_start"]), all_rows[order], stops[order], starts[order])
    return windows.append_column("eval_start", pa.array(eval_start[order].astype(np.int32)))


def context_offsets(manifest: dict, columns: list[str]) -> tuple[int, ...]:
    """Each context feature gets its own id range in one shared context vocabulary (0 = unknown)."""
    sizes = manifest["context_features"]
    shifts, at = [], 0
    for name in columns:
        shifts.append(at)
        at += sizes[name] + 1
    return tuple(shifts)
