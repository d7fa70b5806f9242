"""Per-user sequences and splits: pure, vectorised functions on Arrow tables.

They run inside Ray tasks (one user-hash partition each) and in the single-process
baseline of benchmarks/data_pipeline.py alike, so both do exactly the same work.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import LeaveOneOutSplit, TimeSplit
from .jagged import concat_ranges, offsets_from_lengths

LIST_COLUMNS = ("items", "actions", "timestamps", "values")


def _same_as_previous(*columns: np.ndarray) -> np.ndarray:
    """Row i equals row i-1 on every column (NaN equals NaN); row 0 never does."""
    same = np.ones(len(columns[0]), dtype=bool)
    same[0] = False
    for col in columns:
        if col.dtype.kind == "f":
            a, b = col[1:], col[:-1]
            same[1:] &= (a == b) | (np.isnan(a) & np.isnan(b))
        else:
            same[1:] &= col[1:] == col[:-1]
    return same


def _time_order(user: np.ndarray, ts: np.ndarray, src: np.ndarray) -> np.ndarray:
    """The permutation sorting events by (user, timestamp, source order)."""
    if len(src) > 1 and not np.all(src[1:] > src[:-1]):
        return np.lexsort((src, ts, user))
    # Events arrive in source order (a partition is its chunks' files, in chunk order), so a
    # stable sort on (user, timestamp) is enough: packed into one int64 key where they fit,
    # one single-key sort instead of a three-key lexsort.
    low = int(ts.min())
    time_bits = (int(ts.max()) - low).bit_length()
    if int(user.min()) >= 0 and int(user.max()).bit_length() + time_bits < 63:
        return np.argsort((user.astype(np.int64) << time_bits) | (ts - low), kind="stable")
    return np.lexsort((ts, user))


def build_sequences(events: pa.Table, merge_actions: bool) -> tuple[pa.Table, dict]:
    """Events with dense `user`/`item` -> one row per user, sorted by (timestamp, source order).

    Duplicate rule: events identical in (user, item, timestamp, action, value) are one
    event; the first in source order is kept, the others are counted and dropped.
    Merge rule (merge_actions): the distinct actions on one (user, item, timestamp)
    become one event, action = OR(1 << id), value = the largest, position = the first.
    """
    if events.num_rows == 0:
        return _empty(), {"duplicates": 0, "merged": 0}
    user = events["user"].to_numpy()
    item = events["item"].to_numpy()
    ts = events["timestamp"].to_numpy()
    action = events["action"].to_numpy()
    value = events["value"].to_numpy()
    src = events["source_order"].to_numpy()

    order = _time_order(user, ts, src)
    user, item, ts, action, value = (c[order] for c in (user, item, ts, action, value))
    if merge_actions:
        action = (np.int32(1) << action).astype(np.int32)
    stats = {"duplicates": 0, "merged": 0}
    keep = np.ones(len(user), dtype=bool)
    # Only events sharing their (user, timestamp) with another can be duplicates or be
    # merged (a few percent in real logs): those alone go through the six-key sort.
    first = ~_same_as_previous(user, ts)
    shared = np.flatnonzero(~(first & np.append(first[1:], True)))
    if len(shared):
        # a position in the time order stands for the source order inside one (user, timestamp)
        by = np.lexsort((shared, value[shared], action[shared], item[shared], ts[shared], user[shared]))
        pos = shared[by]
        duplicate = _same_as_previous(user[pos], item[pos], ts[pos], action[pos], value[pos])
        stats["duplicates"] = int(duplicate.sum())
        pos = pos[~duplicate]
        keep[shared] = False
        if merge_actions:
            starts = np.flatnonzero(~_same_as_previous(user[pos], item[pos], ts[pos]))
            stats["merged"] = len(pos) - len(starts)
            merged_action = np.bitwise_or.reduceat(action[pos], starts)
            merged_value = np.fmax.reduceat(value[pos], starts)
            pos = np.minimum.reduceat(pos, starts)
            action[pos], value[pos] = merged_action, merged_value
        keep[pos] = True
    user, item, ts, action, value = (c[keep] for c in (user, item, ts, action, value))
    starts = np.flatnonzero(~_same_as_previous(user))
    offsets = pa.array(np.append(starts, len(user)).astype(np.int32))
    table = pa.table(
        {
            "user": pa.array(user[starts].astype(np.int32)),
            "items": pa.ListArray.from_arrays(offsets, pa.array(item.astype(np.int32))),
            "actions": pa.ListArray.from_arrays(offsets, pa.array(action.astype(np.int32))),
            "timestamps": pa.ListArray.from_arrays(offsets, pa.array(ts.astype(np.int64))),
            "values": pa.ListArray.from_arrays(offsets, pa.array(value.astype(np.float32))),
        }
    )
    return table, stats


def _empty() -> pa.Table:
    return pa.table(
        {
            "user": pa.array([], pa.int32()),
            "items": pa.array([], pa.list_(pa.int32())),
            "actions": pa.array([], pa.list_(pa.int32())),
            "timestamps": pa.array([], pa.list_(pa.int64())),
            "values": pa.array([], pa.list_(pa.float32())),
        }
    )


def list_lengths(table: pa.Table) -> np.ndarray:
    offsets = table["items"].combine_chunks().offsets.to_numpy()
    return np.diff(offsets)


def slice_lists(table: pa.Table, rows: np.ndarray, stops: np.ndarray, starts: np.ndarray | None = None) -> pa.Table:
    """Keep `rows` of the table (a row may repeat), each list column cut to its elements
    [starts[i], stops[i]) (from its first element when `starts` is None)."""
    rows = pa.array(rows, pa.int64())
    starts = np.zeros(len(rows), np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(stops, dtype=np.int64) - starts
    new_offsets = pa.array(offsets_from_lengths(lengths).astype(np.int32))
    columns = []
    for name in table.column_names:
        column = table[name].combine_chunks()
        if name in LIST_COLUMNS:  # one gather of the kept elements, straight from the full lists
            # .offsets index into .values (the whole child array, even for a sliced list)
            flat = concat_ranges(column.offsets.to_numpy()[:-1][rows.to_numpy()] + starts, lengths)
            column = pa.ListArray.from_arrays(new_offsets, column.values.take(pa.array(flat)))
        else:
            column = column.take(rows)
        columns.append(column)
    return pa.table(columns, schema=table.schema)


def _user_fraction(users: np.ndarray) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per user (splits users without a seed)."""
    mixed = (users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
    return mixed.astype(np.float64) / float(1 << 53)


def make_splits(sequences: pa.Table, split, cutoff: int | None = None) -> tuple[dict, dict]:
    """Full sequences -> {"train", "valid", "test"} tables plus counts.

    valid/test rows carry `eval_start`: positions >= eval_start are evaluation
    targets, everything before is history.
    - leave-one-out: train = all but the last two items; valid = history + the
      second-to-last (eval_start = n-2); test = history + the last (eval_start = n-1).
      Users with fewer than 3 events train on everything and are not evaluated.
    - time: train = events at or before the cutoff; a user with events on both
      sides is evaluated on every event after it (eval_start = events <= cutoff),
      in valid or test by a stable hash of the user (valid_fraction).
    """
    n = list_lengths(sequences)
    rows = np.arange(len(n))
    if isinstance(split, LeaveOneOutSplit):
        long_enough = n >= 3
        train = slice_lists(sequences, rows, np.where(long_enough, n - 2, n))
        ev = rows[long_enough]
        valid = slice_lists(sequences, ev, n[ev] - 1)
        test = slice_lists(sequences, ev, n[ev])
        valid = valid.append_column("eval_start", pa.array((n[ev] - 2).astype(np.int32)))
        test = test.append_column("eval_start", pa.array((n[ev] - 1).astype(np.int32)))
        short = int((~long_enough).sum())
    elif isinstance(split, TimeSplit):
        ts = sequences["timestamps"].combine_chunks()
        before = (ts.values.to_numpy() <= cutoff).astype(np.int64) if len(ts) else np.zeros(0, np.int64)
        offsets = ts.offsets.to_numpy()
        cumulative = np.concatenate([[0], np.cumsum(before)])
        n_before = cumulative[offsets[1:]] - cumulative[offsets[:-1]]
        has_train = n_before > 0
        train = slice_lists(sequences, rows[has_train], n_before[has_train])
        evaluated = has_train & (n_before < n)
        to_valid = _user_fraction(sequences["user"].to_numpy()) < split.valid_fraction
        v, t = rows[evaluated & to_valid], rows[evaluated & ~to_valid]
        valid = slice_lists(sequences, v, n[v]).append_column("eval_start", pa.array(n_before[v].astype(np.int32)))
        test = slice_lists(sequences, t, n[t]).append_column("eval_start", pa.array(n_before[t].astype(np.int32)))
        short = int((~evaluated).sum())
    else:
        raise TypeError(f"unknown split {split!r}")
    splits = {"train": train, "valid": valid, "test": test}
    counts = {f"{k}_users": v.num_rows for k, v in splits.items()}
    counts.update({f"{k}_events": int(list_lengths(v).sum()) if v.num_rows else 0 for k, v in splits.items()})
    counts["users_not_evaluated"] = short
    return splits, counts


def split_warnings(split, users: int, valid_users: int, test_users: int, cutoff: int | None,
                   first_last: list) -> list[str]:
    """Why the valid or the test split came out empty (nothing to select or score a model on), or []."""
    if valid_users and test_users:
        return []
    empty = "no valid and no test users" if not (valid_users or test_users) else \
        f"no {'valid' if not valid_users else 'test'} users"
    if isinstance(split, LeaveOneOutSplit):
        why = (f"leave_one_out evaluates users with at least 3 events (the last two are held out) and every one "
               f"of the {users:,} users has fewer")
    elif valid_users or test_users:
        evaluated = valid_users + test_users
        why = (f"valid_fraction {split.valid_fraction} sends every evaluated user to "
               f"{'test' if test_users else 'valid'}" if split.valid_fraction in (0, 1) else
               f"only {evaluated:,} users have events on both sides of the cutoff, and the user hash sent all of "
               f"them to {'test' if test_users else 'valid'} (valid_fraction {split.valid_fraction})")
    else:
        first, last = first_last
        why = (f"the time split evaluates users with events both at or before the cutoff {cutoff} and after it; "
               + (f"every event is at or before it (the last at {last}): choose an earlier cutoff or a quantile"
                  if last is not None and last <= cutoff else
                  f"every event is after it (the first at {first}): no user has history to train on"
                  if first is not None and first > cutoff else "no user has both"))
    return [f"{empty}: {why}"]
