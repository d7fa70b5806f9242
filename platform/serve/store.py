"""User histories for serving: a small interface, the part every implementation shares, and the embedded one.

`HistoryStore` is what the API needs. Both implementations read the prepared sequence table (one row per
user, dense item ids) into memory as the base histories, and keep the events written through /v1/events in
an append log that every replica (every process) asks at each read, so a write is seen by the next request
whatever replica answers it:

    EmbeddedHistoryStore   a sqlite file (WAL: readers and one writer at once; synchronous=FULL: an
                           acknowledged event is on disk): every process on one machine
    RedisHistoryStore      Redis (genrec.serve.redis_store): every process of a cluster

Events are idempotent: each has an identity, its client-supplied `event_id` when given, else its
(item, action, timestamp); an event whose identity the user's log already holds is not stored again, so
a retried write is a no-op that answers as the first one did (`Appended`). The identity is the user's:
two users may use the same event ids.

The log and a refreshed model (genrec.train.refresh) share it:
- an event on an item the model does not know yet (a new item of the catalog) is logged with its raw id
  (embedded store) and stays out of the served history: the model has no row for it. The next refresh
  reads it, adds the item to the vocabulary and trains on it. Likewise a logged dense id past this
  version's vocabulary (written by a grown version, read by the one it grew from after a rollback).
- a refreshed version's data holds the log's events up to the `seq` the refresh read (its manifest's
  `serving_log`): a store over that data skips those rows of that log, so no event is counted twice; and
  it reads a log written under any vocabulary its own extends (old dense ids keep their items).
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.prepared import SEQUENCES, SERVING_LOG, read_manifest, read_table, read_vocab, split_files
from ..data.vocabulary import VOCABULARY, vocabulary_fingerprint
from ..errors import GenrecError

log = logging.getLogger("genrec.serve")


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


class Appended(NamedTuple):
    """What a write answers, the same for a retry of it: `events` = how many distinct events (identities)
    it held, all of them in the history now; `history_length` = the length of the user's history up to and
    including the last of them (the whole history when they were just appended)."""

    events: int
    history_length: int


class HistoryStore(Protocol):
    def history(self, user: str) -> History | None:
        """The user's history, or None for a user never seen."""

    logs_new_items: bool  # whether append takes events on items the model does not know (new_items)

    def append(self, user: str, items: np.ndarray, actions: np.ndarray, timestamps: np.ndarray,
               event_ids: Sequence[str | None] | None = None, new_items: Sequence[str | None] | None = None) -> Appended:
        """Persist the events not yet in the user's log (durably, before returning), atomically. new_items:
        per event, None, or the raw id (as text) of an item the model does not know (its items entry is 0):
        logged for the next refresh, not part of the history until a version that knows it."""

    def users(self, limit: int) -> list[str]:
        """Some known users (for the web page's picker)."""

    def item_counts(self) -> np.ndarray:
        """Events per item (indexed by dense id): the cold-start answer's popularity."""


class StoreUnavailable(GenrecError):
    """The history store cannot be reached (a Redis server down): a 503, not a bad request."""


def user_key(user_id: int | str) -> str:
    """Raw user ids are keyed as text: 42 and "42" are the same user."""
    return str(user_id)


def event_identities(items: np.ndarray, actions: np.ndarray, timestamps: np.ndarray,
                     event_ids: Sequence[str | None] | None, new_items: Sequence[str | None] | None = None) -> list[str]:
    """Each event's identity in its user's log: `id:<event_id>`, else `key:<item>:<action>:<timestamp>`, the
    item an unknown item's raw id as `new:<raw id>` (its dense id is 0 for every unknown item)."""
    ids = event_ids if event_ids is not None else [None] * len(items)
    new = new_items if new_items is not None else [None] * len(items)
    return [f"id:{e}" if e is not None else f"key:{i if n is None else 'new:' + n}:{a}:{t}"
            for e, i, a, t, n in zip(ids, items.tolist(), actions.tolist(), timestamps.tolist(), new)]


def _column(files: list, name: str) -> list[pa.Array]:
    """One column of a table stored as Parquet files, as its chunks, file by file (no other column read)."""
    return [chunk for f in files for chunk in read_table(f, [name]).column(0).chunks]


def _id_type(manifest: dict):
    """The smallest of int32 / int64 that holds every dense item id."""
    return np.int32 if manifest["num_items"] < np.iinfo(np.int32).max else np.int64


def _pylist(files: list, name: str) -> list:
    return [value for chunk in _column(files, name) for value in chunk.to_pylist()]


def _flat(chunks: list[pa.ListArray], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values as dtype, offsets) numpy arrays: row i is values[offsets[i]:offsets[i + 1]]."""
    lengths = [np.zeros(1, np.int64)] + [c.value_lengths().to_numpy(zero_copy_only=False) for c in chunks]
    values = [np.zeros(0, dtype)] + [c.flatten().to_numpy().astype(dtype, copy=False) for c in chunks]
    return np.concatenate(values), np.cumsum(np.concatenate(lengths))


class PreparedHistoryStore:
    """The base histories (the prepared sequence table, in memory) and what a store does with them and its
    event log. A subclass is the log: `_logged` (a user's logged events the model knows the items of) and
    `_log` (append atomically)."""

    logs_new_items = False

    def __init__(self, prepared: str | Path) -> None:
        files = split_files(prepared, SEQUENCES)
        manifest = read_manifest(prepared)
        columns = [c for c in manifest.get("context_features") or {}
                   if c in pq.read_schema(files[0].path, filesystem=files[0].fs).names]
        self._context = list(zip(*(_pylist(files, c) for c in columns))) if columns else None
        users = read_vocab(prepared, "users")
        raw = dict(zip(users["index"].to_pylist(), users["user_id"].to_pylist()))
        self._row = {user_key(raw[u]): i for i, u in enumerate(_pylist(files, "user"))}
        # one column at a time, each one copy, item and action ids in 32 bits (dense ids; checked): at 100M
        # events this is 1.6 GB, where the whole table read at once, combined and converted held 7 GB
        self._lists = {name: _flat(_column(files, name), dtype) for name, dtype in
                       (("items", _id_type(manifest)), ("actions", np.int32), ("timestamps", np.int64))}
        self.vocabulary = vocabulary_fingerprint(prepared)
        # dense ids of the vocabularies this one extends mean the same items: a log of any of them reads
        self._readable = {self.vocabulary, *(manifest.get(VOCABULARY) or {}).get("ancestors", [])}
        self._consumed = manifest.get(SERVING_LOG) or {}  # a refresh's data holds this log's rows up to a seq
        self._num_items = int(manifest["num_items"])

    def _check_log_vocabulary(self, recorded: str, where: str) -> None:
        """A log stores dense ids, which mean items only under the vocabulary they were written with: a log of
        other prepared data (an earlier demo's world, another dataset) would name other or missing items."""
        if recorded not in self._readable:
            raise GenrecError(f"{where}: this events log was written for other prepared data (item vocabulary "
                              f"{recorded[:12]}, the model's data has {self.vocabulary[:12]}): its item ids would "
                              "name other items; point the store at a new log (store.events_db, or another "
                              "store.redis_prefix) or remove it")

    def _logged(self, user: str) -> np.ndarray:
        """The user's logged events on items of this vocabulary (1..num_items), oldest first: (n, 3) int64
        rows of item, action, timestamp."""
        raise NotImplementedError

    def _log(self, user: str, rows: np.ndarray, identities: list[str], new_items: Sequence[str | None] | None) -> int:
        """Append the rows whose identity the user's log lacks, in one atomic step (two replicas writing the
        same retry at once store it once) -> how many of the user's logged events the model knows the items
        of, up to and including the last of the given identities."""
        raise NotImplementedError

    def _base(self, user: str) -> tuple[np.ndarray, ...] | None:
        row = self._row.get(user)
        if row is None:
            return None
        return tuple(values[offsets[row]:offsets[row + 1]].astype(np.int64) for values, offsets in
                     (self._lists[name] for name in ("items", "actions", "timestamps")))

    def history(self, user: str) -> History | None:
        base = self._base(user)
        logged = self._logged(user)
        if base is None and not len(logged):
            return None
        context = ()
        if base is None:
            base = tuple(np.zeros(0, np.int64) for _ in range(3))
        elif self._context is not None:
            context = tuple(self._context[self._row[user]])
        return History(*(np.concatenate([b, logged[:, j]]) for j, b in enumerate(base)), context=context)

    def append(self, user: str, items: np.ndarray, actions: np.ndarray, timestamps: np.ndarray,
               event_ids: Sequence[str | None] | None = None, new_items: Sequence[str | None] | None = None) -> Appended:
        if not self.logs_new_items and new_items is not None and any(n is not None for n in new_items):
            raise GenrecError(f"{type(self).__name__} does not log events on items the model does not know")
        identities = event_identities(items, actions, timestamps, event_ids, new_items)
        rows = np.stack([items, actions, timestamps], axis=1).astype(np.int64).reshape(-1, 3)
        position = self._log(user, rows, identities, new_items)
        base = self._base(user)
        return Appended(len(set(identities)), (0 if base is None else len(base[0])) + position)

    def users(self, limit: int) -> list[str]:
        return list(itertools.islice(self._row, limit))  # not a list of every user first

    def item_counts(self) -> np.ndarray:
        # the prepared table only: popularity is a property of the training data, fixed while serving
        return np.bincount(self._lists["items"][0])


EVENT_COLUMNS = {"seq", "user", "item", "action", "timestamp"}


class EmbeddedHistoryStore(PreparedHistoryStore):
    """The event log in a sqlite file: table `events`, its rows in `seq` order, `event_key` the identity
    (unique per user; NULL for a duplicate written before events were idempotent, which stays history),
    `new_item` the raw id of an item the model did not know (item 0); table `meta`: the vocabulary the
    dense ids mean and `log_id`, this log's identity (a refresh records which log it read)."""

    logs_new_items = True

    def __init__(self, prepared: str | Path, events_db: str | Path) -> None:
        super().__init__(prepared)
        self.path = Path(events_db)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            self._create_or_migrate()
        except sqlite3.DatabaseError as err:
            raise GenrecError(f"{self.path}: not a usable events log ({err}); store.events_db must name a "
                              f"genrec events file or a new one") from None

    def _create_or_migrate(self) -> None:
        # autocommit, with an explicit IMMEDIATE transaction: replicas starting at once migrate a file once
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
                if not columns:
                    db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL,"
                               " item INTEGER NOT NULL, action INTEGER NOT NULL, timestamp INTEGER NOT NULL,"
                               " event_key TEXT)")
                elif not EVENT_COLUMNS <= columns:
                    raise GenrecError(f"{self.path}: table events has columns {sorted(columns)}, not a genrec "
                                      f"events log (expected {sorted(EVENT_COLUMNS | {'event_key'})})")
                elif "event_key" not in columns:
                    self._add_identities(db)
                if "new_item" not in {row[1] for row in db.execute("PRAGMA table_info(events)")}:
                    db.execute("ALTER TABLE events ADD COLUMN new_item TEXT")
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.execute("INSERT OR IGNORE INTO meta VALUES ('vocabulary', ?)", (self.vocabulary,))
                db.execute("INSERT OR IGNORE INTO meta VALUES ('log_id', ?)", (uuid.uuid4().hex,))
                meta = dict(db.execute("SELECT key, value FROM meta"))
                self._check_log_vocabulary(meta["vocabulary"], str(self.path))
                # the rows a refresh put into this data are in the base histories: skipped here
                self._skip_through = int(self._consumed.get("through_seq", 0)) \
                    if self._consumed.get("log_id") == meta["log_id"] else 0
                db.execute("CREATE INDEX IF NOT EXISTS events_user ON events (user, seq)")
                db.execute("CREATE UNIQUE INDEX IF NOT EXISTS events_identity ON events (user, event_key)")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _add_identities(self, db: sqlite3.Connection) -> None:
        """A file from before events were idempotent: each event gets its (item, action, timestamp) identity;
        a duplicate the old code stored twice keeps its place in the history, with no identity."""
        db.execute("ALTER TABLE events ADD COLUMN event_key TEXT")
        db.execute("UPDATE events SET event_key = 'key:' || item || ':' || action || ':' || timestamp"
                   " WHERE seq IN (SELECT MIN(seq) FROM events GROUP BY user, item, action, timestamp)")
        log.warning("%s: events log migrated (event_key added: events written before are identified by "
                    "their item, action and timestamp)", self.path)

    def _db(self) -> sqlite3.Connection:
        # one connection per thread: sqlite connections are not shared across threads
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged write is on disk
        return db

    def _logged(self, user: str) -> np.ndarray:
        logged = self._db().execute("SELECT item, action, timestamp FROM events WHERE user = ? AND seq > ? "
                                    "AND item BETWEEN 1 AND ? ORDER BY seq",
                                    (user, self._skip_through, self._num_items)).fetchall()
        return np.asarray(logged, dtype=np.int64).reshape(-1, 3)

    def _log(self, user: str, rows: np.ndarray, identities: list[str], new_items: Sequence[str | None] | None) -> int:
        db = self._db()
        new = new_items if new_items is not None else [None] * len(rows)
        with db:  # one transaction (its first insert takes the write lock): all the events or none
            db.executemany("INSERT INTO events (user, item, action, timestamp, event_key, new_item) VALUES "
                           "(?, ?, ?, ?, ?, ?) ON CONFLICT (user, event_key) DO NOTHING",
                           [(user, *row, key, n) for row, key, n in zip(rows.tolist(), identities, new)])
            unique = list(dict.fromkeys(identities))
            (last,) = db.execute(f"SELECT MAX(seq) FROM events WHERE user = ? AND event_key IN "
                                 f"({', '.join('?' * len(unique))})", (user, *unique)).fetchone()
            (position,) = db.execute("SELECT COUNT(*) FROM events WHERE user = ? AND seq > ? AND seq <= ? "
                                     "AND item BETWEEN 1 AND ?", (user, self._skip_through, last,
                                                                  self._num_items)).fetchone()
        return position
