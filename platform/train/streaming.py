"""One-pass streaming training, the setting of the paper's synthetic and industrial
tables: the model sees the time-ordered data once, and every window of time is
evaluated before it is trained on.

    windows of train.window_days, from the first event of the data
    for each window: evaluate_window (rank 0; with sharded tables every worker, each its block)
                     -> train on it (one pass) -> log -> checkpoint

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
import torch

from ..data.batches import count_targets
from ..data.jagged import concat_ranges
from .batching import evaluation_batches, sampled_users
from .evaluation import evaluate, whole_catalog

DAY = 86_400


def window_edges(sequences: pa.Table, window_days: float, start: int | None = None) -> np.ndarray:
    """[W + 1] Unix-second boundaries: windows of `window_days` from the first event (or from `start`:
    earlier events are history only) to past the last one (the last window may be shorter in events,
    never in time)."""
    stamps = sequences["timestamps"].combine_chunks().values.to_numpy()
    if len(stamps) == 0 or (start is not None and stamps.max() < start):
        raise ValueError("no events to stream over" + (f" from {start}" if start is not None else ""))
    first = stamps.min() if start is None else start
    width = window_days * DAY
    count = int((stamps.max() - first) // width) + 1
    return first + np.round(np.arange(count + 1) * width).astype(np.int64)


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


def evaluate_window(model, table: pa.Table, spec, batch_size: int, ties: str, users: float = 1.0,
                    catalog=whole_catalog) -> dict:
    """Full-ranking metrics of the window's targets (of a `users` share of its users, see sampled_users),
    as `window/<metric>` plus `window/targets`; catalog: as genrec.train.evaluation.evaluate takes it."""
    table = sampled_users(table, users)
    if not count_targets(table):
        return {"window/targets": 0.0}  # the sample holds no event with a history in this window
    metrics = evaluate(model, evaluation_batches(table, spec, batch_size), ties=ties, catalog=catalog)
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
    """The windows of a prepared dataset's full sequences, built one at a time; from `start` when given
    (a refresh: events before it are the histories the windows' events are scored from)."""

    def __init__(self, sequences: pa.Table, window_days: float, start: int | None = None) -> None:
        self.sequences = sequences.combine_chunks()  # once, not per window and column
        self.edges = window_edges(sequences, window_days, start)

    def __len__(self) -> int:
        return len(self.edges) - 1

    def window(self, index: int) -> tuple[pa.Table, int]:
        return window_table(self.sequences, int(self.edges[index]), int(self.edges[index + 1]))


class Popularity(torch.nn.Module):
    """The popularity ranker in the shape evaluate() ranks: every item scored by its number of events
    before a time (item vectors of one dimension, every user's vector 1), the user's own history
    excluded as for any model."""

    def __init__(self, counts: np.ndarray) -> None:
        super().__init__()
        self.counts = torch.as_tensor(counts, dtype=torch.float32).unsqueeze(1)  # exact below 2**24 events

    def forward(self, item_ids, timestamps, target_timestamps, offsets) -> torch.Tensor:
        return torch.ones(len(item_ids), 1)

    def all_item_embeddings(self) -> torch.Tensor:
        return self.counts


def popularity_stream(sequences: pa.Table, window_days: float, spec, batch_size: int, ties: str,
                      users: float = 1.0) -> dict:
    """The stream metrics (add_to_stream) of Popularity on a one-pass run's own targets: each window
    (2..W) ranked with the counts of every event before it, as evaluate_window ranks the model's."""
    windows = StreamWindows(sequences, window_days)
    items = windows.sequences["items"].combine_chunks().values.to_numpy()
    stamps = windows.sequences["timestamps"].combine_chunks().values.to_numpy()
    stream = {}
    for index in range(1, len(windows)):
        table, targets = windows.window(index)
        if not targets:
            continue
        counts = np.bincount(items[stamps < windows.edges[index]], minlength=spec.num_items + 1)
        scored = evaluate_window(Popularity(counts), table, spec, batch_size, ties, users)
        if scored["window/targets"]:
            stream.update(add_to_stream(stream, scored))
    return stream
