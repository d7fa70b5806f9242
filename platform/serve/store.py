"""User histories for serving: a small interface, and the embedded implementation.

`HistoryStore` is what the API needs; a real key-value store (Redis, Cassandra, ...)
implements the same three methods. `EmbeddedHistoryStore` reads the prepared
sequence table (one row per user, dense item ids) into memory and keeps the events
written through /v1/events in a sqlite append log: they survive a restart of the
app or of any replica, and every replica (every process) sees them, because each
read asks the log. sqlite's WAL mode lets readers and one writer work at once.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq

from ..data.prepared import SEQUENCES, VOCAB, read_manifest, read_split


@dataclass(frozen=True)
class History:
    """One user's events, oldest first, dense item ids. version = how many events
    the user has ever had: it grows with every append, so (user, version) names a
    history exactly (the model's user cache is keyed by it)."""

    items: np.ndarray  # int64
    actions: np.ndarray  # int64 (the dataset's action id or bitmask)
    timestamps: np.ndarray  # int64
    context: tuple[int, ...] = ()  # the user's context features (manifest order; 0 = unknown), if the data has any

    @property
    def version(self) -> int:
        return len(self.items)


class HistoryStore(Protocol):
    def history(self, user: str) -> History | None:
        """The user's history, or None for a user never seen."""

    def append(self, user: str, items: np.ndarray, actions: np.ndarray, timestamps: np.ndarray) -> int:
        """Persist events (durably, before returning) -> the user's new history length."""

    def users(self, limit: int) -> list[str]:
        """Some known users (for the web page's picker)."""

    def item_counts(self) -> np.ndarray:
        """Events per item (indexed by dense id): the cold-start answer's popularity."""


def user_key(user_id: int | str) -> str:
    """Raw user ids are keyed as text: 42 and "42" are the same user."""
    return str(user_id)


class EmbeddedHistoryStore:
    def __init__(self, prepared: str | Path, events_db: str | Path) -> None:
        table = read_split(prepared, SEQUENCES)
        columns = [c for c in read_manifest(prepared).get("context_features") or {} if c in table.column_names]
        self._context = list(zip(*(table[c].to_pylist() for c in columns))) if columns else None
        users = pq.read_table(Path(prepared) / VOCAB / "users.parquet")
        raw = dict(zip(users["index"].to_pylist(), users["user_id"].to_pylist()))
        self._row = {user_key(raw[u]): i for i, u in enumerate(table["user"].to_pylist())}
        self._lists = {}
        for name in ("items", "actions", "timestamps"):
            column = table[name].combine_chunks()
            self._lists[name] = (column.values.to_numpy().astype(np.int64), column.offsets.to_numpy())
        self.path = Path(events_db)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL,"
                       " item INTEGER NOT NULL, action INTEGER NOT NULL, timestamp INTEGER NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS events_user ON events (user, seq)")

    def _db(self) -> sqlite3.Connection:
        # one connection per thread: sqlite connections are not shared across threads
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged write is on disk
        return db

    def _base(self, user: str) -> tuple[np.ndarray, ...] | None:
        row = self._row.get(user)
        if row is None:
            return None
        return tuple(values[offsets[row]:offsets[row + 1]] for values, offsets in
                     (self._lists[name] for name in ("items", "actions", "timestamps")))

    def history(self, user: str) -> History | None:
        base = self._base(user)
        logged = self._db().execute("SELECT item, action, timestamp FROM events WHERE user = ? ORDER BY seq",
                                    (user,)).fetchall()
        if base is None and not logged:
            return None
        extra = np.asarray(logged, dtype=np.int64).reshape(-1, 3)
        context = ()
        if base is None:
            base = tuple(np.zeros(0, np.int64) for _ in range(3))
        elif self._context is not None:
            context = tuple(self._context[self._row[user]])
        return History(*(np.concatenate([b, extra[:, j]]) for j, b in enumerate(base)), context=context)

    def append(self, user: str, items: np.ndarray, actions: np.ndarray, timestamps: np.ndarray) -> int:
        db = self._db()
        with db:  # one transaction: all the events or none
            db.executemany("INSERT INTO events (user, item, action, timestamp) VALUES (?, ?, ?, ?)",
                           [(user, int(i), int(a), int(t)) for i, a, t in zip(items, actions, timestamps)])
        return self.history(user).version

    def users(self, limit: int) -> list[str]:
        return list(self._row)[:limit]

    def item_counts(self) -> np.ndarray:
        # the prepared table only: popularity is a property of the training data, fixed while serving
        return np.bincount(self._lists["items"][0])
