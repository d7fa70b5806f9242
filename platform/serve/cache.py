"""The per-user cache of encoded histories a model replica keeps (genrec.serve.model.Scorer): a bounded
LRU of M-FALCON `HistoryCache`s, so that a user's history is encoded once per version and only the
events appended since run at the next request. A serving concern: the cached attention math itself is
genrec.model.mfalcon's."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

from ..model.mfalcon import HistoryCache


class UserCache:
    """Bounded LRU of `HistoryCache`s keyed by (user, history version): at most
    `max_bytes` of tensors in all. One entry per user, its newest version: storing a
    version drops the user's older one, and an older version never replaces a newer
    one (two requests racing). Safe to share between threads.

    Key it by model as well (one UserCache per loaded model): a cache is only valid
    for the weights that built it."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[Hashable, tuple[int, HistoryCache]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user: Hashable, version: int) -> HistoryCache | None:
        """The user's cache at exactly this version, or None (a miss)."""
        with self._lock:
            entry = self._entries.get(user)
            if entry is None or entry[0] != version:
                self.misses += 1
                return None
            self._entries.move_to_end(user)
            self.hits += 1
            return entry[1]

    def latest(self, user: Hashable) -> tuple[int, HistoryCache] | None:
        """(version, cache) of the newest version held for the user: what
        `extend_history` starts from when events were appended since."""
        with self._lock:
            entry = self._entries.get(user)
            if entry is not None:
                self._entries.move_to_end(user)
            return entry

    def put(self, user: Hashable, version: int, cache: HistoryCache) -> bool:
        """Store (evicting least recently used users to fit); False when not stored:
        a newer version is already held, or the entry alone exceeds max_bytes."""
        size = cache.nbytes
        with self._lock:
            held = self._entries.get(user)
            if held is not None and held[0] > version:
                return False
            if held is not None:
                self.nbytes -= held[1].nbytes
                del self._entries[user]
            if size > self.max_bytes:
                return False
            while self.nbytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
                self.evictions += 1
            self._entries[user] = (version, cache)
            self.nbytes += size
            return True
