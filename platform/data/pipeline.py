"""The data pipeline: source -> canonical events -> vocabularies -> sequences -> splits.

    summary = prepare(cfg.data)          # inside a running Ray cluster

Three Ray Data stages, each a map over a small dataset of work items:

1. canonicalize: one task per source chunk parses and validates rows, writes
   rejects, and hash-partitions accepted events by user into Parquet files
   (`_events/bucket=K/chunk-C.parquet`): the shuffle goes through storage, so
   memory stays flat at any scale and no event crosses the object store.
2. vocabulary: one task per partition returns its distinct users and items;
   the driver sorts them into dense ids (1..V, 0 = padding).
3. sequences: one task per partition maps to dense ids, sorts by (timestamp,
   source order), drops exact duplicates, merges same-impression actions,
   attaches user context, cuts the splits and writes Parquet.

File names come from chunk and partition numbers, so two runs on the same input
write the same bytes. Output is built in a hidden sibling folder and renamed into
place only when complete: a failed run leaves nothing that looks finished.
On a cluster the output folder (and so the staging area beside it) must be on
storage every node sees (NFS or a mounted bucket); more CPU workers mean more
chunks and partitions processed at once, with the same code.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import ConfigError, DataConfig, TimeSplit, resolve_path
from ..errors import GenrecError
from .adapters import SourcePlan, plan_source, read_chunk
from .prepared import MANIFEST, REJECTS, SEQUENCES, SPLITS, VOCAB
from .schema import SCHEMA_VERSION, sequence_schema
from .sequences import build_sequences, make_splits



class OutputExistsError(GenrecError, FileExistsError):
    """The output folder exists and data.overwrite is off."""


# ----------------------------------------------------------------------------- partitioning

def user_partition(user_ids: pa.Array, num_partitions: int) -> np.ndarray:
    """A stable partition per raw user id (ints or strings), same on every machine."""
    hashed = pd.util.hash_array(user_ids.to_numpy(zero_copy_only=False))
    return (hashed % np.uint64(num_partitions)).astype(np.int32)


def _part(index: int) -> str:
    return f"part-{index:05d}.parquet"


def canonicalize_chunk(index: int, plan: SourcePlan, cfg: DataConfig, known_items, staging: Path) -> dict:
    """Stage 1 for one chunk: parse, validate, write rejects and partitioned events."""
    events, rejects, input_rows = read_chunk(plan.chunks[index], cfg, plan.action_lookup, known_items)
    if events.num_rows + rejects.num_rows != input_rows:
        raise RuntimeError(
            f"{plan.chunks[index].path}: chunk {index} read {input_rows} rows but accepted "
            f"{events.num_rows} + rejected {rejects.num_rows}"
        )
    if rejects.num_rows:
        pq.write_table(rejects, staging / REJECTS / _part(index))
    parts = user_partition(events["user_id"], cfg.num_partitions)
    for p in np.unique(parts):
        folder = staging / "_events" / f"bucket={p:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(events.filter(pa.array(parts == p)), folder / f"chunk-{index:06d}.parquet")
    ts = events["timestamp"]
    return {
        "chunk": index,
        "input_rows": input_rows,
        "accepted": events.num_rows,
        "rejected": rejects.num_rows,
        "min_timestamp": pc.min(ts).as_py() if events.num_rows else None,
        "max_timestamp": pc.max(ts).as_py() if events.num_rows else None,
    }


def _read_partition(staging: Path, partition: int, columns=None) -> pa.Table | None:
    folder = staging / "_events" / f"bucket={partition:05d}"
    files = sorted(folder.glob("chunk-*.parquet")) if folder.exists() else []
    if not files:
        return None
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)


def partition_vocabulary(partition: int, staging: Path) -> dict:
    """Stage 2 for one partition: its distinct users and items, and a timestamp sketch."""
    table = _read_partition(staging, partition, ["user_id", "item_id", "timestamp"])
    if table is None:
        return {"partition": partition, "users": [], "items": [], "ts_quantiles": [], "events": 0}
    ts = table["timestamp"].to_numpy()
    return {
        "partition": partition,
        "users": pc.unique(table["user_id"]).to_pylist(),
        "items": pc.unique(table["item_id"]).to_pylist(),
        "ts_quantiles": np.quantile(ts, np.linspace(0, 1, 1001)).tolist(),
        "events": len(ts),
    }


def partition_sequences(partition: int, staging: Path, vocab: dict, cfg: DataConfig, merge_actions: bool, cutoff) -> dict:
    """Stage 3 for one partition: dense ids, sequences, context, splits -> Parquet."""
    events = _read_partition(staging, partition)
    context = vocab["user_context"]
    schema = sequence_schema(list(context))
    if events is None:
        sequences = schema.empty_table()
        stats = {"duplicates": 0, "merged": 0}
    else:
        dense = pa.table(
            {
                "user": pc.add(pc.index_in(events["user_id"], value_set=vocab["users"]), 1),
                "item": pc.add(pc.index_in(events["item_id"], value_set=vocab["items"]), 1),
                "timestamp": events["timestamp"],
                "action": events["action"],
                "value": events["value"],
                "source_order": events["source_order"],
            }
        )
        sequences, stats = build_sequences(dense, merge_actions)
        users = sequences["user"].to_numpy()
        for name, per_user in context.items():
            sequences = sequences.append_column(name, pa.array(per_user[users]))
        sequences = sequences.cast(schema)
    splits, counts = make_splits(sequences, cfg.split, cutoff)
    out = staging / SEQUENCES
    pq.write_table(sequences, out / _part(partition))
    for name, table in splits.items():
        pq.write_table(table, staging / name / _part(partition))
    return {
        "partition": partition,
        "users": sequences.num_rows,
        "events": int(pc.sum(pc.list_value_length(sequences["items"])).as_py() or 0),
        **stats,
        **counts,
    }


# ----------------------------------------------------------------------------- driver

def _map(items: list[dict], fn, **kwargs) -> list[dict]:
    """Run fn(**item, **kwargs) over work items as a Ray Data map; one row of stats each."""
    import ray

    def apply(batch: pd.DataFrame) -> pd.DataFrame:
        rows = [fn(**{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}, **kwargs) for row in batch.to_dict("records")]
        return pd.DataFrame([{"stats": json.dumps(r)} for r in rows])

    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    rows = ds.map_batches(apply, batch_size=1, batch_format="pandas", num_cpus=1).take_all()
    return sorted((json.loads(r["stats"]) for r in rows), key=lambda r: list(r.values())[0])


def _vocabularies(plan: SourcePlan, cfg: DataConfig, parts: list[dict]) -> dict:
    users = pa.array(sorted(u for p in parts for u in p["users"]))
    observed = pa.array(sorted({i for p in parts for i in p["items"]}))
    if cfg.item_universe == "catalog":
        if plan.catalog is None:
            raise ConfigError("data.item_universe: 'catalog' needs a source with an item catalog; use 'observed'")
        items = pc.unique(plan.catalog["item_id"]).sort()
    else:
        items = observed
    context = {}
    context_vocab = {}
    if plan.users is not None and plan.context_columns:
        lookup = pc.index_in(users, value_set=pc.cast(plan.users["user_id"], users.type) if len(users) else plan.users["user_id"])
        for name in plan.context_columns:
            raw = pc.cast(plan.users[name], pa.string())
            values = pc.unique(raw.drop_null()).sort()
            ids = pc.add(pc.index_in(raw, value_set=values), 1).fill_null(0).to_numpy()
            per_user = np.zeros(len(users) + 1, dtype=np.int32)  # 0 = unknown
            known = ~lookup.is_null().to_numpy(zero_copy_only=False)
            per_user[1:][known] = ids[lookup.fill_null(0).to_numpy()[known]]
            context[name] = per_user
            context_vocab[name] = values.to_pylist()
    return {"users": users, "items": items, "observed_items": len(observed), "user_context": context, "context_vocab": context_vocab}


def _cutoff(cfg: DataConfig, parts: list[dict]):
    if not isinstance(cfg.split, TimeSplit):
        return None
    if cfg.split.cutoff is not None:
        return cfg.split.cutoff
    # weighted merge of per-partition quantile sketches (1,001 points each)
    points = np.concatenate([p["ts_quantiles"] for p in parts if p["events"]])
    weights = np.concatenate([np.full(1001, p["events"] / 1001) for p in parts if p["events"]])
    order = np.argsort(points)
    cumulative = np.cumsum(weights[order]) / weights.sum()
    return int(points[order][np.searchsorted(cumulative, cfg.split.quantile)])


def _write_vocab(folder: Path, plan: SourcePlan, vocab: dict) -> None:
    folder.mkdir()
    items = vocab["items"]
    table = pa.table({"index": pa.array(np.arange(1, len(items) + 1, dtype=np.int32)), "item_id": items})
    if plan.catalog is not None:
        row = pc.index_in(items, value_set=pc.cast(plan.catalog["item_id"], items.type))
        features = plan.catalog.drop_columns(["item_id"]).take(row)
        for name in features.column_names:
            table = table.append_column(name, features[name])
    pq.write_table(table, folder / "items.parquet")
    users = vocab["users"]
    pq.write_table(pa.table({"index": pa.array(np.arange(1, len(users) + 1, dtype=np.int32)), "user_id": users}), folder / "users.parquet")
    (folder / "context.json").write_text(json.dumps(vocab["context_vocab"], indent=1))


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder exists: {out}; set data.overwrite=true to replace it atomically")


def _replace(staging: Path, out: Path) -> None:
    """Move the finished output into place; an old one is swapped out, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)


def prepare(cfg: DataConfig, log=print) -> dict:
    """Run the pipeline on the connected Ray cluster; returns the summary (also in the manifest)."""
    started = time.time()
    out = resolve_path(cfg.output_dir)
    _check_output(out, cfg.overwrite)
    plan = plan_source(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.incomplete-{uuid.uuid4().hex[:8]}")
    for sub in (REJECTS, SEQUENCES, *SPLITS):
        (staging / sub).mkdir(parents=True)
    try:
        known_items = None
        if cfg.item_universe == "catalog" and plan.catalog is not None:
            known_items = set(plan.catalog["item_id"].to_pylist())
        log(f"[prepare] stage 1/3: canonicalize {len(plan.chunks)} chunks")
        chunks = _map(
            [{"index": i} for i in range(len(plan.chunks))], canonicalize_chunk,
            plan=plan, cfg=cfg, known_items=known_items, staging=staging,
        )
        partitions = [{"partition": p} for p in range(cfg.num_partitions)]
        log(f"[prepare] stage 2/3: vocabularies over {cfg.num_partitions} user partitions")
        parts = _map(partitions, partition_vocabulary, staging=staging)
        vocab = _vocabularies(plan, cfg, parts)
        cutoff = _cutoff(cfg, parts)
        log("[prepare] stage 3/3: sequences and splits")
        seq_stats = _map(
            partitions, partition_sequences,
            staging=staging, vocab=vocab, cfg=cfg, merge_actions=plan.merge_actions, cutoff=cutoff,
        )
        _write_vocab(staging / VOCAB, plan, vocab)
        shutil.rmtree(staging / "_events")
        summary = _summary(cfg, plan, chunks, seq_stats, vocab, cutoff, staging)
        summary["seconds"] = round(time.time() - started, 2)
        (staging / MANIFEST).write_text(json.dumps(_manifest(summary), indent=1, sort_keys=True))
        _check_output(out, cfg.overwrite)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["output_dir"] = str(out)
    return summary


def _summary(cfg, plan, chunks, seq_stats, vocab, cutoff, staging: Path) -> dict:
    total = lambda rows, key: int(sum(r[key] for r in rows))  # noqa: E731
    rejected = total(chunks, "rejected")
    reasons: dict = {}
    for f in sorted((staging / REJECTS).glob("*.parquet")):
        for reason in pq.read_table(f, columns=["reason"])["reason"].to_pylist():
            kind = reason.split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
    summary = {
        "input_rows": total(chunks, "input_rows"),
        "accepted": total(chunks, "accepted"),
        "rejected": rejected,
        "rejected_by_reason": reasons,
        "duplicates_dropped": total(seq_stats, "duplicates"),
        "merged_into_bitmask": total(seq_stats, "merged"),
        "sequence_events": total(seq_stats, "events"),
        "users": total(seq_stats, "users"),
        "items_observed": vocab["observed_items"],
        "item_universe": cfg.item_universe,
        "num_items": len(vocab["items"]),
        "actions": plan.actions,
        "action_encoding": "bitmask" if plan.merge_actions else "index",
        "context_features": {k: len(v) for k, v in vocab["context_vocab"].items()},
        "split": {**cfg.split.model_dump(), "cutoff_used": cutoff},
        "timestamps": [
            min((c["min_timestamp"] for c in chunks if c["min_timestamp"] is not None), default=None),
            max((c["max_timestamp"] for c in chunks if c["max_timestamp"] is not None), default=None),
        ],
    }
    for key in ("train_users", "valid_users", "test_users", "train_events", "valid_events", "test_events", "users_not_evaluated"):
        summary[key] = total(seq_stats, key)
    summary["source_checksums_sha256"] = plan.checksums
    from ..config import SyntheticSource

    if isinstance(cfg.source, SyntheticSource):  # the generator's exact oracle and popularity baseline
        from .synthetic import read_oracle

        summary["synthetic_oracle"] = read_oracle(cfg.source)
    if summary["input_rows"] != summary["accepted"] + summary["rejected"]:
        raise RuntimeError(f"row accounting broke: {summary}")
    if summary["accepted"] != summary["sequence_events"] + summary["duplicates_dropped"] + summary["merged_into_bitmask"]:
        raise RuntimeError(f"event accounting broke: {summary}")
    return summary


def _manifest(summary: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": True,
        "layout": {"sequences": f"{SEQUENCES}/", "splits": list(SPLITS), "rejects": f"{REJECTS}/", "vocab": f"{VOCAB}/"},
        **{k: v for k, v in summary.items() if k != "seconds"},
    }
