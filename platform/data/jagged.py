"""Jagged arrays in numpy (values + offsets), the data side's twin of genrec.model.jagged."""

import numpy as np


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l): a vectorised gather index."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def select_sequences(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """The sequences of a jagged batch where `keep` [B] is true; per-token arrays have the
    batch's total length, `users` one entry per sequence."""
    lengths = np.diff(batch["offsets"])
    tokens = np.repeat(keep, lengths)
    out = {k: v[tokens] for k, v in batch.items() if k not in ("offsets", "users")}
    out["users"] = batch["users"][keep]
    out["offsets"] = offsets_from_lengths(lengths[keep])
    return out
