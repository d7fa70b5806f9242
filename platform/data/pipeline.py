"""The data pipeline: source -> canonical events -> vocabularies -> sequences -> splits.

    summary = prepare(cfg.data)          # inside a running Ray cluster

Three stages of Ray tasks (genrec.data.tasks.run_tasks), one task per work item:

1. canonicalize: one task per source chunk parses and validates rows
   (genrec.data.validation), writes rejects, and hash-partitions accepted events
   by user into Arrow IPC files (`_events/bucket=K/chunk-C.arrow`): the shuffle
   goes through storage, so memory stays flat at any scale and no event crosses
   the object store. A source read by Ray Data (genrec.data.ray_source: any ray.data.read_*
   reader, or a Dataset given to `prepare`) runs as Ray Data first; then one task per block of it.
2. vocabulary: one task per partition returns its distinct users and items as
   Arrow arrays; the driver merges them into dense ids (1..V, 0 = padding): no id
   travels as a Python object.
3. sequences: one task per partition maps to dense ids, sorts by (timestamp,
   source order), drops exact duplicates, merges same-impression actions,
   attaches user context, cuts the splits and writes Parquet.

File names come from chunk and partition numbers, so two runs on the same input
write the same bytes. Every run writes a fresh version folder inside data.output_dir
(genrec.data.prepared) and publishes it by writing manifest.json last: a failed run
leaves nothing that looks finished, and an object store, which cannot rename,
publishes the same way as a local disk. The staged events live in that version
folder too (`_events/`, `_item_features/`), so on a cluster whose nodes share no
disk data.output_dir is an object-store URI (s3://bucket/prefix) and every task
reads and writes through it; more CPU workers mean more chunks and partitions
processed at once, with the same code.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ..config import ConfigError, DataConfig, RayDataSource, SyntheticSource, TimeSplit
from ..errors import GenrecError
from ..storage import Location, check_writable, location
from .adapters import SourceError, SourcePlan, plan_source, read_chunk
from .prepared import (DATA_PREFIX, KEY, MANIFEST, REJECTS, SEQUENCES, SPLITS, VOCAB, read_table, version_name,
                       write_table)
from .ray_source import check_dataset, dataset_blocks, plan_dataset, read_block
from .schema import SCHEMA_VERSION, sequence_schema
from .sequences import build_sequences, make_splits, split_warnings
from .tasks import run_tasks


class OutputExistsError(GenrecError, FileExistsError):
    """The output folder exists and data.overwrite is off."""


# ----------------------------------------------------------------------------- partitioning

def user_partition(user_ids: pa.Array, num_partitions: int) -> np.ndarray:
    """A stable partition per raw user id (ints or strings), same on every machine."""
    if pa.types.is_integer(user_ids.type):
        # pandas.util.hash_array's integer hash (the splitmix64 finaliser), written out: importing
        # pandas costs every Ray worker a second of start-up, for this one function
        hashed = user_ids.to_numpy().astype(np.int64).view(np.uint64)
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            hashed = (hashed ^ (hashed >> np.uint64(shift))) * np.uint64(factor)
        hashed ^= hashed >> np.uint64(31)
    else:
        import pandas as pd

        hashed = pd.util.hash_array(user_ids.to_numpy(zero_copy_only=False))
    return (hashed % np.uint64(num_partitions)).astype(np.int32)


def _part(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _write_output(table: pa.Table, loc: Location) -> None:
    """An output table as Parquet. No dictionary encoding: ids, times and actions have too
    many distinct values for it to pay (it doubled the write time); zstd makes files
    smaller than the default snappy at less cost."""
    write_table(table, loc, use_dictionary=False, compression="zstd")


def _write_staged(table: pa.Table, loc: Location) -> None:
    """Staged events between stages: Arrow IPC, read back without decoding (Parquet's encode
    and decode cost more than the whole parse of a chunk)."""
    loc.parent.mkdir()
    with loc.fs.open_output_stream(loc.path) as stream, pa.ipc.new_file(stream, table.schema) as writer:
        writer.write_table(table)


def _read_staged(loc: Location) -> pa.Table:
    """A staged file: memory-mapped on a local disk (no copy), in one GET from an object store."""
    source = pa.memory_map(loc.path) if loc.is_local else pa.py_buffer(loc.read_bytes())
    return pa.ipc.open_file(source).read_all()


def canonicalize_chunk(index: int, plan: SourcePlan, cfg: DataConfig, catalog, staging: Location | str) -> dict:
    """Stage 1 for one chunk: parse, validate, write rejects, item features and partitioned events."""
    events, rejects, features, input_rows = read_chunk(plan.chunks[index], plan.rules, catalog)
    return _stage_chunk(index, plan.chunks[index].path, events, rejects, features, input_rows, cfg, staging)


def canonicalize_block(index: int, block, plan: SourcePlan, cfg: DataConfig, catalog, staging: Location | str) -> dict:
    """Stage 1 for one block of a Ray Data source's Dataset (genrec.data.ray_source): a chunk, validated alike."""
    events, rejects, features, input_rows = read_block(index, block, cfg.source, plan.rules, catalog)
    return _stage_chunk(index, f"dataset block {index}", events, rejects, features, input_rows, cfg, staging)


def _stage_chunk(index: int, where: str, events: pa.Table, rejects: pa.Table, features: pa.Table | None,
                 input_rows: int, cfg: DataConfig, staging: Location | str) -> dict:
    """Chunk `index`'s outputs into the version folder: rejects, item features and events by user partition."""
    staging = location(staging, KEY)
    if events.num_rows + rejects.num_rows != input_rows:
        raise RuntimeError(
            f"{where}: chunk {index} read {input_rows} rows but accepted "
            f"{events.num_rows} + rejected {rejects.num_rows}"
        )
    if rejects.num_rows:
        write_table(rejects, staging / REJECTS / _part(index))
    if features is not None and features.num_rows:
        write_table(features, staging / "_item_features" / _part(index))
    parts = user_partition(events["user_id"], cfg.num_partitions)
    order = np.argsort(parts, kind="stable")  # one gather, then a slice per partition
    grouped, bounds = events.take(pa.array(order)), np.searchsorted(parts[order], np.arange(cfg.num_partitions + 1))
    for p in range(cfg.num_partitions):
        if bounds[p + 1] > bounds[p]:
            _write_staged(grouped.slice(bounds[p], bounds[p + 1] - bounds[p]),
                          staging / "_events" / f"bucket={p:05d}" / f"chunk-{index:06d}.arrow")
    ts = events["timestamp"]
    return {
        "chunk": index,
        "input_rows": input_rows,
        "accepted": events.num_rows,
        "rejected": rejects.num_rows,
        "min_timestamp": pc.min(ts).as_py() if events.num_rows else None,
        "max_timestamp": pc.max(ts).as_py() if events.num_rows else None,
    }


def _read_partition(staging: Location, partition: int, columns=None) -> pa.Table | None:
    """A partition's staged events, in chunk order (so in source order)."""
    files = (staging / "_events" / f"bucket={partition:05d}").list_files(suffixes=(".arrow",))
    if not files:
        return None
    tables = [_read_staged(f) for f in files]
    return pa.concat_tables(t.select(columns) if columns else t for t in tables)


def partition_vocabulary(partition: int, staging: Location | str, sketch: bool) -> dict:
    """Stage 2 for one partition: its distinct users and items (Arrow arrays), and with
    `sketch` a timestamp quantile sketch (for a quantile time split)."""
    table = _read_partition(location(staging, KEY), partition, ["user_id", "item_id", "timestamp"])
    if table is None:
        return {"partition": partition, "ts_quantiles": [], "events": 0, "user_id": None, "item_id": None}
    ts = table["timestamp"].to_numpy()
    return {
        "partition": partition,
        "ts_quantiles": np.quantile(ts, np.linspace(0, 1, 1001)).tolist() if sketch else [],
        "events": len(ts),
        **{name: pc.unique(table[name]) for name in ("user_id", "item_id")},
    }


def _merge_vocab(parts: list[dict], name: str) -> pa.Array:
    """The distinct values of `name` over all partitions, sorted."""
    arrays = [p[name] for p in parts if p[name] is not None]
    if not arrays:
        return pa.array([], pa.int64())
    values = pa.chunked_array(arrays).combine_chunks()
    return pc.unique(values).sort() if name == "item_id" else values.sort()  # users: partitions are disjoint


def dense_ids(values: pa.ChunkedArray, vocab: pa.Array) -> pa.Array:
    """Each value's 1-based position in the sorted vocabulary (0 is padding)."""
    if pa.types.is_integer(vocab.type) and len(vocab) and len(values):
        low, high = vocab[0].as_py(), vocab[-1].as_py()
        bounds = pc.min_max(values).as_py()
        if high - low < 4 * len(vocab) + (1 << 20) and low <= bounds["min"] and bounds["max"] <= high:
            # Catalog ids are mostly compact: then a lookup table makes the mapping one gather,
            # where index_in would build a hash set of the whole vocabulary in every task.
            table = np.zeros(high - low + 1, dtype=np.int32)
            table[vocab.to_numpy() - low] = np.arange(1, len(vocab) + 1, dtype=np.int32)
            return pa.array(table[values.to_numpy() - low])
    return pc.add(pc.index_in(values, value_set=vocab), pa.scalar(1, pa.int32()))


def partition_sequences(partition: int, staging: Location | str, vocab: dict, cfg: DataConfig, merge_actions: bool,
                        cutoff) -> dict:
    """Stage 3 for one partition: dense ids, sequences, context, splits -> Parquet."""
    staging = location(staging, KEY)
    events = _read_partition(staging, partition)
    context = vocab["user_context"]
    schema = sequence_schema(list(context))
    if events is None:
        sequences = schema.empty_table()
        stats = {"duplicates": 0, "merged": 0}
    else:
        dense = pa.table(
            {
                "user": dense_ids(events["user_id"], vocab["users"]),
                "item": dense_ids(events["item_id"], vocab["items"]),
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
    _write_output(sequences, staging / SEQUENCES / _part(partition))
    for name, table in splits.items():
        _write_output(table, staging / name / _part(partition))
    return {
        "partition": partition,
        "users": sequences.num_rows,
        "events": int(pc.sum(pc.list_value_length(sequences["items"])).as_py() or 0),
        **stats,
        **counts,
    }


# ----------------------------------------------------------------------------- driver

def item_universe(cfg: DataConfig, plan: SourcePlan) -> str:
    """The configured universe, or by default the source's catalog where it has one."""
    if cfg.item_universe is None:
        return "catalog" if plan.catalog is not None else "observed"
    if cfg.item_universe == "catalog" and plan.catalog is None:
        raise ConfigError("data.item_universe: 'catalog' needs a source with an item catalog; use 'observed'")
    return cfg.item_universe


def _vocabularies(plan: SourcePlan, universe: str, parts: list[dict]) -> dict:
    users = _merge_vocab(parts, "user_id")
    observed = _merge_vocab(parts, "item_id")
    items = pc.unique(plan.catalog["item_id"]).sort() if universe == "catalog" else observed
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


def _item_features(staging: Location) -> pa.Table | None:
    """Kept feature columns: per item, the value on its first event in source order."""
    files = (staging / "_item_features").list_files(suffixes=(".parquet",))
    if not files:
        return None
    table = pa.concat_tables(read_table(f) for f in files).sort_by([("item_id", "ascending"), ("source_order", "ascending")])
    first = np.unique(table["item_id"].to_numpy(zero_copy_only=False), return_index=True)[1]
    return table.take(pa.array(first)).drop_columns(["source_order"])


def _write_vocab(folder: Location, plan: SourcePlan, vocab: dict, staging: Location) -> None:
    items = vocab["items"]
    table = pa.table({"index": pa.array(np.arange(1, len(items) + 1, dtype=np.int32)), "item_id": items})
    for catalog in (plan.catalog, _item_features(staging)):
        if catalog is None:
            continue
        row = pc.index_in(items, value_set=pc.cast(catalog["item_id"], items.type))
        features = catalog.drop_columns(["item_id"]).take(row)
        for name in features.column_names:
            table = table.append_column(name, features[name])
    write_table(table, folder / "items.parquet")
    users = vocab["users"]
    write_table(pa.table({"index": pa.array(np.arange(1, len(users) + 1, dtype=np.int32)), "user_id": users}),
                folder / "users.parquet")
    (folder / "context.json").write_text(json.dumps(vocab["context_vocab"], indent=1))


def _check_output(out: Location, overwrite: bool) -> None:
    """Before any work: an output this job may not write (a missing bucket, refused credentials, a
    read-only grant) and, without overwrite, an existing one stop the job with one line."""
    made = out.is_local and not out.exists()
    try:
        check_writable(out, KEY)
    finally:
        if made:
            _remove_if_empty(out)  # the write check's folder: no trace of a job that stops here
    _refuse_existing(out, overwrite)


def _refuse_existing(out: Location, overwrite: bool) -> None:
    if not overwrite and (out / MANIFEST).is_file():
        raise OutputExistsError(f"output folder exists: {out}; set data.overwrite=true to replace it atomically")


def _remove_if_empty(folder: Location) -> None:
    try:
        folder.local_path().rmdir()
    except OSError:  # not empty (or gone): kept
        pass


def _publish(out: Location, version: Location, manifest: dict, overwrite: bool) -> None:
    """Make `version` the output: the manifest naming it is written last, in one PUT (readers see the
    old version or the new, never a mix); with overwrite, what the old manifest named (an older
    version, or the folders of the layout before versions) is deleted after."""
    _refuse_existing(out, overwrite)  # another run may have finished meanwhile (the write check ran at start)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if overwrite:
        for entry in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=False)):
            if entry.base_name not in (MANIFEST, version.name):
                (out / entry.base_name).delete()


def _discard(out: Location, version: Location, made: bool) -> None:
    """After a failed run: its version folder (no manifest names it) and the output folder it made."""
    try:
        version.delete()
    except OSError:  # best effort: the run's own error is the one to report
        pass
    if made:
        _remove_if_empty(out)


def plan_before_ray(cfg: DataConfig) -> SourcePlan | None:
    """The checks that need no Ray, for a job to run before it starts Ray (seconds): an output that
    exists or cannot be written, and the source's plan (a missing, empty or malformed file, storage that
    refuses); None for a synthetic source, whose generator runs as Ray tasks. Pass the plan to `prepare`."""
    check_dataset(cfg.source, None)  # a job has no Dataset to give: a ray_data source names its reader
    _check_output(location(cfg.output_dir, KEY), cfg.overwrite)
    return None if isinstance(cfg.source, SyntheticSource) else _plan(cfg)


def _plan(cfg: DataConfig) -> SourcePlan:
    """The source's chunks; for a Ray Data source its rules alone (its blocks come from the Dataset)."""
    return plan_dataset(cfg) if isinstance(cfg.source, RayDataSource) else plan_source(cfg)


def prepare(cfg: DataConfig, log=print, plan: SourcePlan | None = None, dataset=None) -> dict:
    """Run the pipeline on the connected Ray cluster; returns the summary (also in the manifest).
    plan: from `plan_before_ray` on the same config, else made here. dataset: a ray.data.Dataset of
    events, for a source of kind ray_data that names no reader (genrec.data.ray_source)."""
    check_dataset(cfg.source, dataset)
    started = time.time()
    out = location(cfg.output_dir, KEY)
    made = out.is_local and not out.exists()
    _check_output(out, cfg.overwrite)
    version = out / version_name()
    try:
        plan = plan or _plan(cfg)
        summary = _run_stages(cfg, plan, out, version, log, started, dataset)
        summary["seconds"] = round(time.time() - started, 2)
        _publish(out, version, _manifest(summary, version), cfg.overwrite)
    except BaseException:
        _discard(out, version, made)
        raise
    summary["output_dir"] = out.uri
    return summary


def _run_stages(cfg: DataConfig, plan: SourcePlan, out: Location, version: Location, log, started: float,
                dataset=None) -> dict:
    """The three stages into the version folder, then its vocabulary; returns the summary."""
    universe = item_universe(cfg, plan)
    catalog = plan.catalog["item_id"].combine_chunks() if universe == "catalog" else None
    if isinstance(cfg.source, RayDataSource):
        log(f"[prepare] stage 1/3: canonicalize the Ray Data dataset's blocks ({time.time() - started:.1f} s)")
        work, canonicalize = dataset_blocks(cfg.source, dataset), canonicalize_block
    else:
        log(f"[prepare] stage 1/3: canonicalize {len(plan.chunks)} chunks ({time.time() - started:.1f} s)")
        work, canonicalize = [{"index": i} for i in range(len(plan.chunks))], canonicalize_chunk
    chunks = run_tasks(canonicalize, work, plan=plan, cfg=cfg, catalog=catalog, staging=version)
    _check_accepted(chunks, version, out, cfg)
    partitions = [{"partition": p} for p in range(cfg.num_partitions)]
    log(f"[prepare] stage 2/3: vocabularies over {cfg.num_partitions} user partitions ({time.time() - started:.1f} s)")
    sketch = isinstance(cfg.split, TimeSplit) and cfg.split.cutoff is None
    parts = run_tasks(partition_vocabulary, partitions, staging=version, sketch=sketch)
    vocab = _vocabularies(plan, universe, parts)
    cutoff = _cutoff(cfg, parts)
    log(f"[prepare] stage 3/3: sequences and splits ({time.time() - started:.1f} s)")
    seq_stats = run_tasks(partition_sequences, partitions, staging=version, vocab=vocab, cfg=cfg,
                          merge_actions=plan.merge_actions, cutoff=cutoff)
    _write_vocab(version / VOCAB, plan, vocab, version)
    for scratch in ("_events", "_item_features"):
        (version / scratch).delete()
    summary = _summary(cfg, plan, chunks, seq_stats, vocab, cutoff, version, universe)
    for warning in summary["warnings"]:
        log(f"[prepare] warning: {warning}")
    return summary


def rejects_by_reason(staging: Location) -> dict:
    """Rejects counted by the kind of reason: its text up to the details, numbers as N."""
    reasons: dict = {}
    for f in (staging / REJECTS).list_files(suffixes=(".parquet",)):
        kinds = read_table(f, columns=["reason"])["reason"]
        for pattern, by in ((r"(:| \[|;).*$", ""), (r"'[^']*'", ""), (r"[0-9]+", "N")):
            kinds = pc.replace_substring_regex(kinds, pattern, by)
        kinds = pc.utf8_trim_whitespace(kinds)
        for row in pc.value_counts(kinds.combine_chunks()).to_pylist():
            reasons[row["values"]] = reasons.get(row["values"], 0) + row["counts"]
    return dict(sorted(reasons.items()))


def _move(source: Location, target: Location) -> None:
    """A folder to another place on the same storage: renamed on a local disk, copied then deleted on
    an object store (which has no rename)."""
    target.delete()
    if source.is_local:
        source.fs.move(source.path, target.path)
    else:
        pafs.copy_files(source.path, target.path, source_filesystem=source.fs, destination_filesystem=target.fs)
        source.delete()


def _check_accepted(chunks: list[dict], staging: Location, out: Location, cfg: DataConfig) -> None:
    """Every row rejected: stop with why, and keep the rejects that say so (beside the output)."""
    if sum(c["accepted"] for c in chunks):
        return
    total = sum(c["input_rows"] for c in chunks)
    reasons = rejects_by_reason(staging)
    kept = out.parent / f"{out.name}.rejects"
    if (staging / REJECTS).is_dir():
        _move(staging / REJECTS, kept)
    hint = ""
    if reasons.get("timestamp out of range"):
        values = pc.extract_regex(read_table(kept.list_files(suffixes=(".parquet",))[0], columns=["reason"])["reason"],
                                  r"timestamp out of range \[.*\]: (?P<v>-?[0-9]+)$")
        seconds = [int(v["v"]) // 1000 for v in values.to_pylist()[:1000] if v]
        if seconds and all(cfg.timestamp_min <= s <= cfg.timestamp_max for s in seconds):
            hint = "; the timestamps look like milliseconds: set data.source.timestamp_unit: ms"
    listed = ", ".join(f"{k} ({v:,})" for k, v in reasons.items())
    raise SourceError(f"all {total:,} rows rejected: {listed}; rejects kept at {kept}{hint}")


def _summary(cfg, plan, chunks, seq_stats, vocab, cutoff, staging: Location, universe: str) -> dict:
    total = lambda rows, key: int(sum(r[key] for r in rows))  # noqa: E731
    rejected = total(chunks, "rejected")
    reasons = rejects_by_reason(staging)
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
        "item_universe": universe,
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
    summary["warnings"] = split_warnings(cfg.split, summary["users"], summary["valid_users"], summary["test_users"],
                                         cutoff, summary["timestamps"])
    summary["source_checksums_sha256"] = plan.checksums
    if isinstance(cfg.source, SyntheticSource):  # the generator's exact oracle and popularity baseline
        from .synthetic import read_oracle

        summary["synthetic_oracle"] = read_oracle(cfg.source)
    if summary["input_rows"] != summary["accepted"] + summary["rejected"]:
        raise RuntimeError(f"row accounting broke: {summary}")
    if summary["accepted"] != summary["sequence_events"] + summary["duplicates_dropped"] + summary["merged_into_bitmask"]:
        raise RuntimeError(f"event accounting broke: {summary}")
    return summary


def _manifest(summary: dict, version: Location) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": True,
        DATA_PREFIX: version.name,
        "layout": {"sequences": f"{SEQUENCES}/", "splits": list(SPLITS), "rejects": f"{REJECTS}/", "vocab": f"{VOCAB}/"},
        **{k: v for k, v in summary.items() if k != "seconds"},
    }
