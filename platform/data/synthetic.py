"""Synthetic event logs at any scale, generated in parallel Ray tasks straight to Parquet.

Each shard owns a contiguous range of users and draws from its own RNG stream
(seed, shard), so the output is the same for a seed whatever the parallelism,
and no process ever holds more than one shard.

- item popularity is Zipf-like: P(rank k) ~ 1 / k^s, ranks scattered over item ids;
- user lengths are heavy-tailed (log-normal, clipped to [min, max]);
- each impression gets one action drawn from `action_rates`, and with
  `multi_action_rate` a second, different action at the same second (the
  bitmask-merge case);
- timestamps increase within a user (log-normal gaps, seconds to days);
- users have context features: gender, age bucket, region.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import SyntheticSource, resolve_path

CONTEXT_CARDINALITY = {"gender": 2, "age_bucket": 7, "region": 50}
EVENTS_DIR = "events"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"


def default_path(source: SyntheticSource) -> Path:
    spec = source.model_dump(exclude={"path"})
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return resolve_path(f"outputs/raw/synthetic-{digest}")


def _user_lengths(rng, n, source: SyntheticSource):
    # log-normal with sigma 1: mean = exp(mu + 1/2)
    mu = np.log(source.mean_events_per_user) - 0.5
    lengths = np.rint(rng.lognormal(mu, 1.0, size=n)).astype(np.int64)
    return np.clip(lengths, source.min_events_per_user, source.max_events_per_user)


def _popularity_cdf(num_items, exponent):
    weights = 1.0 / np.arange(1, num_items + 1, dtype=np.float64) ** exponent
    return np.cumsum(weights) / weights.sum()


def generate_shard(source: SyntheticSource, shard: int, out_dir: str) -> int:
    """Write one shard's events; returns its number of rows."""
    users_per_shard = -(-source.num_users // source.num_shards)
    first_user = shard * users_per_shard
    n_users = max(0, min(source.num_users, first_user + users_per_shard) - first_user)
    rng = np.random.default_rng([source.seed, shard])
    item_of_rank = np.random.default_rng([source.seed, 1 << 30]).permutation(source.num_items) + 1

    lengths = _user_lengths(rng, n_users, source)
    n = int(lengths.sum())
    user_ids = np.repeat(np.arange(first_user + 1, first_user + n_users + 1, dtype=np.int64), lengths)
    ranks = np.searchsorted(_popularity_cdf(source.num_items, source.zipf_exponent), rng.random(n))
    items = item_of_rank[np.minimum(ranks, source.num_items - 1)]

    names = list(source.action_rates)
    rates = np.array([source.action_rates[a] for a in names], dtype=np.float64)
    actions = rng.choice(len(names), size=n, p=rates / rates.sum()).astype(np.int32)

    gaps = np.rint(rng.lognormal(7.0, 2.0, size=n)).astype(np.int64)  # median ~18 min, long tail
    starts = source.start_time + rng.integers(0, 365 * 86_400, size=n_users)
    user_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    cumulative = np.cumsum(gaps)
    timestamps = np.repeat(starts, lengths) + cumulative - cumulative[user_start] if n else cumulative

    # a second action on the same impression, exercising the bitmask merge
    extra = np.flatnonzero(rng.random(n) < source.multi_action_rate) if len(names) > 1 else np.array([], int)
    extra_actions = ((actions[extra] + rng.integers(1, len(names), size=len(extra))) % len(names)).astype(np.int32)
    order = np.argsort(np.concatenate([np.arange(n), extra]), kind="stable")
    table = pa.table(
        {
            "user_id": np.concatenate([user_ids, user_ids[extra]])[order],
            "item_id": np.concatenate([items, items[extra]]).astype(np.int64)[order],
            "timestamp": np.concatenate([timestamps, timestamps[extra]])[order],
            "action": pa.array(np.array(names, dtype=object)[np.concatenate([actions, extra_actions])[order]]),
        }
    )
    pq.write_table(table, Path(out_dir) / EVENTS_DIR / f"part-{shard:05d}.parquet", row_group_size=1 << 20)
    return table.num_rows


def _write_side_tables(source: SyntheticSource, out: Path) -> None:
    rng = np.random.default_rng([source.seed, 1 << 31])
    users = {"user_id": np.arange(1, source.num_users + 1, dtype=np.int64)}
    for name, card in CONTEXT_CARDINALITY.items():
        users[name] = rng.integers(0, card, size=source.num_users).astype(np.int32)
    pq.write_table(pa.table(users), out / USERS_FILE)
    item_ids = np.arange(1, source.num_items + 1, dtype=np.int64)
    category = rng.integers(0, 30, size=source.num_items)
    pq.write_table(
        pa.table({"item_id": item_ids, "genres": [[f"category_{c}"] for c in category]}), out / ITEMS_FILE
    )


def generate(source: SyntheticSource) -> Path:
    """Generate (once) and return the folder; an existing complete folder is reused."""
    import ray
    from tqdm import tqdm

    out = resolve_path(source.path) if source.path else default_path(source)
    marker = out / "_COMPLETE"
    if marker.exists():
        return out
    staging = out.with_name(out.name + ".incomplete")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    (staging / EVENTS_DIR).mkdir(parents=True)
    _write_side_tables(source, staging)
    task = ray.remote(generate_shard).options(num_cpus=1)
    pending = [task.remote(source, shard, str(staging)) for shard in range(source.num_shards)]
    rows = 0
    with tqdm(total=len(pending), desc="generate synthetic shards", unit="shard") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            rows += ray.get(done[0])
            bar.update(1)
    (staging / "_COMPLETE").write_text(json.dumps({"rows": rows, "config": source.model_dump()}, indent=1))
    staging.rename(out)
    return out
