"""The event log in Redis: user histories a cluster's replicas share (store.kind: redis).

Per user two keys, `<prefix>:{<user>}:log` (a list of events, 24 bytes each: item, action, timestamp as
little-endian int64) and `<prefix>:{<user>}:ids` (a hash: event identity -> its position in the list); the
braces keep both in one Redis Cluster slot. One Lua script appends the events whose identity is new and
records their positions: Redis runs a script whole, alone, so two replicas writing the same retry at once
store it once, and the AOF holds the script's writes as one transaction (all of an acknowledged write or
none of it after a restart). It logs only events on items the model knows (logs_new_items is False): the
API refuses the others with a 422 (the embedded store keeps them for the next refresh).

Durability is the server's: with `appendonly yes` and `appendfsync always` Redis fsyncs the AOF before it
answers, so an acknowledged event is never lost (`make redis` runs it so). The store checks the server's
settings at start against store.redis_durability and warns, once per setting, when they fall short.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from ..config import ConfigError
from .store import PreparedHistoryStore, StoreUnavailable

log = logging.getLogger("genrec.serve")

# KEYS: the user's log, its identities; ARGV: identity, packed event, identity, packed event, ...
# -> the log position of the last of the given identities
APPEND = """
local last = 0
for i = 1, #ARGV, 2 do
  local position = redis.call('HGET', KEYS[2], ARGV[i])
  if position then
    position = tonumber(position)
  else
    position = redis.call('RPUSH', KEYS[1], ARGV[i + 1])
    redis.call('HSET', KEYS[2], ARGV[i], position)
  end
  if position > last then last = position end
end
return last
"""

LEVELS = ("none", "everysec", "always")  # store.redis_durability, least durable first


def server_durability(settings: dict) -> tuple[str, str, str]:
    """A server's persistence settings (CONFIG GET) -> (its durability level, the setting that decides it,
    what a crash loses with it)."""
    if settings.get("appendonly") != "yes":
        return "none", "appendonly", "every event since the last RDB snapshot (all of them without snapshots)"
    fsync = settings.get("appendfsync")
    if fsync == "always":
        return "always", "appendfsync", "no acknowledged event"
    if fsync == "everysec":
        return "everysec", "appendfsync", "up to about 2 s of acknowledged events"
    return "none", "appendfsync", "what the OS has not written to disk yet (about 30 s on Linux)"


_warned: set[tuple[str, str]] = set()  # (server, setting): a replica warns once, not at every rollout


def redacted(url: str) -> str:
    """The URL without its credentials, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


class RedisHistoryStore(PreparedHistoryStore):
    def __init__(self, prepared: str | Path, url: str, prefix: str = "genrec", durability: str = "always") -> None:
        super().__init__(prepared)
        self.where, self.prefix = redacted(url), prefix
        try:
            # appends are idempotent (event identities), so a call that timed out is safe to run again
            self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                              retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1), 4),
                                              retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        except ValueError as err:  # its message names the scheme, never the URL
            raise ConfigError(f"store.redis_url: {err}") from None
        self._append = self.redis.register_script(APPEND)
        self._call(self.redis.ping)
        self._check_durability(durability)
        key = f"{prefix}:vocabulary"
        self._call(self.redis.set, key, self.vocabulary, nx=True)
        self._check_log_vocabulary(self._call(self.redis.get, key).decode(), f"{self.where} prefix {prefix!r}")

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise StoreUnavailable(f"the history store at {self.where} is unreachable: {err}") from None

    def _check_durability(self, durability: str) -> None:
        try:
            server = self._call(self.redis.config_get, "append*")
        except redis.ResponseError as err:  # CONFIG renamed away (managed Redis services often do)
            if durability != "none":
                self._warn_once("CONFIG", f"Redis at {self.where} refuses CONFIG GET ({err}): its persistence "
                                f"cannot be checked; store.redis_durability={durability} is assumed, not verified")
            return
        level, setting, loses = server_durability(server)
        if LEVELS.index(level) < LEVELS.index(durability):
            self._warn_once(setting, f"Redis at {self.where} runs with {setting} {server.get(setting)}: a crash "
                            f"can lose {loses}, but store.redis_durability is {durability} (run redis-server with "
                            f"--appendonly yes --appendfsync {durability}, as `make redis` does, or lower it)")

    def _warn_once(self, setting: str, message: str) -> None:
        if (self.where, setting) not in _warned:
            _warned.add((self.where, setting))
            log.warning("%s", message)

    def _keys(self, user: str) -> tuple[str, str]:
        return f"{self.prefix}:{{{user}}}:log", f"{self.prefix}:{{{user}}}:ids"

    def _logged(self, user: str, last: int = -1) -> np.ndarray:
        """The user's logged events on items of this vocabulary, of the first `last` log entries (all: -1)."""
        rows = self._call(self.redis.lrange, self._keys(user)[0], 0, last - 1 if last > 0 else -1)
        logged = np.frombuffer(b"".join(rows), dtype="<i8").astype(np.int64).reshape(-1, 3)
        return logged[(logged[:, 0] >= 1) & (logged[:, 0] <= self._num_items)]

    def _log(self, user: str, rows: np.ndarray, identities: list[str], new_items=None) -> int:
        packed = rows.astype("<i8")
        args = [a for key, row in zip(identities, packed) for a in (key, row.tobytes())]
        last = int(self._call(self._append, keys=self._keys(user), args=args))
        return len(self._logged(user, last))  # entries on items another version knows are not history here
