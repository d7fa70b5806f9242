"""The history store a Serve config selects (store.kind): embedded (sqlite, the default) or redis."""

from pathlib import Path

from ..config import ServeStoreConfig
from .redis_store import RedisHistoryStore
from .store import EmbeddedHistoryStore, HistoryStore


def open_history_store(cfg: ServeStoreConfig, prepared: str | Path, events_db: str | Path) -> HistoryStore:
    """The store over the prepared sequence table at `prepared`; events_db is the embedded store's file."""
    if cfg.kind == "redis":
        return RedisHistoryStore(prepared, cfg.redis_url, cfg.redis_prefix, cfg.redis_durability)
    return EmbeddedHistoryStore(prepared, events_db)
