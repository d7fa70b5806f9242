"""One-pass streaming training, the setting of the paper's synthetic and industrial
tables: the model sees the time-ordered data once, and every window of time is
evaluated before it is trained on.

    windows of train.window_days, from the first event of the data
    for each window: evaluate_window (rank 0) -> train on it (one pass) -> log -> checkpoint

A window's targets are the events that happen in it, each predicted from all of its
user's events before it (the most recent batching.max_seq_len of them, however many
of its user's events fall in the window: genrec.data.batches.target_windows) and ranked
against the whole catalog as in genrec.train.evaluation. A user's very first event
has no history and is never a target. The run's result, `stream/<metric>`, is the
mean over the targets of windows 2..W: window 1 is scored by an untrained model
and only logged.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..data.batches import count_targets
from ..data.jagged import concat_ranges
from .batching import evaluation_batches
from .evaluation import evaluate

DAY = 86_400


def window_edges(sequences: pa.Table, window_days: float) -> np.ndarray:
    """[W + 1] Unix-second boundaries: windows of `window_days` from the first event
    to past the last one (the last window may be shorter in events, never in time)."""
    stamps = sequences["timestamps"].combine_chunks().values.to_numpy()
    if len(stamps) == 0:
        raise ValueError("no events to stream over")
    width = window_days * DAY
    count = int((stamps.max() - stamps.min()) // width) + 1
    return stamps.min() + np.round(np.arange(count + 1) * width).astype(np.int64)


def window_table(sequences: pa.Table, start: int, end: int) -> tuple[pa.Table, int]:
    """(rows, number of targets) of the window [start, end): each user with events in
    it, their events before `end`, and `eval_start` = how many came before `start`
    (the batch builder makes every later event a target)."""
    items = sequences["items"].combine_chunks()
    offsets = items.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    stamps = sequences["timestamps"].combine_chunks().values.to_numpy()
    owner = np.repeat(np.arange(len(lengths)), lengths)
    before_end = np.bincount(owner, weights=stamps < end, minlength=len(lengths)).astype(np.int64)
    before_start = np.bincount(owner, weights=stamps < start, minlength=len(lengths)).astype(np.int64)
    # sequences are time-sorted, so a user's events before `end` are a prefix of the list
    rows = np.flatnonzero(before_end > before_start)
    keep_from, keep = offsets[:-1][rows], before_end[rows]
    flat = concat_ranges(keep_from, keep)
    new_offsets = pa.array(np.r_[0, np.cumsum(keep)].astype(np.int32))
    table = pa.table({
        "user": sequences["user"].take(pa.array(rows)),
        **{name: pa.ListArray.from_arrays(new_offsets, sequences[name].combine_chunks().values.take(pa.array(flat)))
           for name in ("items", "actions", "timestamps")},
        "eval_start": pa.array(before_start[rows]),
    })
    return table, count_targets(table)


def sampled_users(table: pa.Table, share: float) -> pa.Table:
    """The rows of a fixed share of users, chosen by a hash of the user id (so the same users in every
    window and every run); all rows when share is 1."""
    if share >= 1:
        return table
    users = table["user"].to_numpy().astype(np.uint64)
    hashed = (users * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)  # Fibonacci hashing, 24 bits
    return table.filter(pa.array(hashed < np.uint64(round(share * (1 << 24)))))


def evaluate_window(model, table: pa.Table, spec, batch_size: int, ties: str, users: float = 1.0) -> dict:
    """Full-ranking metrics of the window's targets (of a `users` share of its users, see sampled_users),
    as `window/<metric>` plus `window/targets`."""
    table = sampled_users(table, users)
    if not count_targets(table):
        return {"window/targets": 0.0}  # the sample holds no event with a history in this window
    metrics = evaluate(model, evaluation_batches(table, spec, batch_size), ties=ties)
    targets = metrics.pop("count")
    return {**{f"window/{k}": v for k, v in metrics.items()}, "window/targets": targets}


def add_to_stream(best: dict, window_metrics: dict) -> dict:
    """The running target-weighted mean over scored windows, as `stream/<metric>`."""
    seen, new = best.get("stream/targets", 0.0), window_metrics["window/targets"]
    out = {"stream/targets": seen + new, "stream/windows": best.get("stream/windows", 0) + 1}
    for key, value in window_metrics.items():
        name = key.removeprefix("window/")
        if name != "targets":
            out[f"stream/{name}"] = (best.get(f"stream/{name}", 0.0) * seen + value * new) / (seen + new)
    return out


class StreamWindows:
    """The windows of a prepared dataset's full sequences, built one at a time."""

    def __init__(self, sequences: pa.Table, window_days: float) -> None:
        self.sequences = sequences.combine_chunks()  # once, not per window and column
        self.edges = window_edges(sequences, window_days)

    def __len__(self) -> int:
        return len(self.edges) - 1

    def window(self, index: int) -> tuple[pa.Table, int]:
        return window_table(self.sequences, int(self.edges[index]), int(self.edges[index + 1]))
