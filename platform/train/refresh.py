"""Keeping a model fresh: the registered model behind an alias continues on the events since
its data cutoff, and the alias moves to the result only if it is not worse (jobs/refresh.py).

    result = refresh(cfg)     # inside a running Ray cluster; cfg.refresh: the model, the sources, the gate

    current_model    the version behind refresh.model (models:/<name>@<alias>), the config that trained it and
                     the prepared data version it was trained on; its cutoff is that data's last event
    new_events       what happened after the cutoff: the rows of data.source's files that data never read,
                     parsed and validated by the prepare's own rules with the cutoff as the earliest time
                     allowed (a late row is rejected as out of range), and/or a Serve app's event log
    publish_window   the vocabularies extended (old ids kept, genrec.data.vocabulary), and a prepared folder of
                     its own: every old history with its new events after it, a time split at the cutoff, and
                     a manifest that records the vocabulary version and the window
    starting_state   the model's weights with its item table grown (new rows start as a new table's), and its
                     AdamW moments grown alike when its run's last checkpoint holds exactly these weights
    fit (one pass)   the training loop's one_pass mode from that state over the window cut in refresh.chunks
                     chunks, each ranked before it is trained on (train.window_passes times); the current model, frozen (new items score
                     with zero rows: it never knew them), ranks the same chunks' events (score_windows)
    judge, promote   the gate on chunks 2..N (chunk 1 is ranked before the new model trained at all), the new version
                     registered with its lineage, the alias moved only when the gate passes

The refreshed data goes to a folder of its own (refresh.output_dir/<name>-v<parent>-<window end>) rather than
a new version of the model's data folder: the served model keeps reading the histories and ids it was
trained with, and every registered version's data stays as it was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..artifact import CONFIG, WEIGHTS, build_model, model_folder
from ..config import ExperimentConfig, SyntheticSource, TimeSplit
from ..data.adapters import canonical_events, plan_source, read_chunk
from ..data.jagged import concat_ranges, offsets_from_lengths
from ..data.pipeline import rejects_by_reason
from ..data.prepared import (DATA_PREFIX, KEY, MANIFEST, REJECTS, SEQUENCES, SERVING_LOG, VOCAB, read_split,
                             read_table, version_name, write_table)
from ..data.schema import EVENT_SCHEMA, REJECT_SCHEMA, ROW_BITS
from ..data.sequences import LIST_COLUMNS, build_sequences, list_lengths, make_splits
from ..data.tasks import run_tasks
from ..data.validation import Rules
from ..data.vocabulary import (VOCABULARY, Vocabulary, dense_index, extend_vocabulary, files_fingerprint,
                               vocabulary_manifest, write_vocabulary)
from ..errors import GenrecError
from ..model.growth import grow_item_tables, state_item_key
from ..storage import Location, location, resolve_path
from . import tracking
from .batching import batch_spec
from .checkpoint import STATE_FILE
from .loop import StartingPoint
from .optim import build_optimizer, grow_optimizer_rows
from .sharding import item_table_names, optimizer_groups
from .streaming import DAY, StreamWindows, evaluate_window
from .trainer import fit, workers_view

KEPT, PROMOTED, NOTHING_NEW = "kept", "promoted", "nothing new"
GATE_KEPT_EXIT = 3  # a job's exit status when the gate kept the alias: no error, but a scheduler should see it
LOG_FILE_INDEX = (1 << (63 - ROW_BITS)) - 1  # the serving log's source order: after every file's at one time
STARTING_STATE = "starting_state.pt"  # in the run's folder, where every worker reads it
PART = "part-00000.parquet"


class RefreshError(GenrecError):
    """A refresh that cannot run: no such model or alias, its data gone, a source with no new files, ..."""


# ----------------------------------------------------------------------------- the current model

@dataclass
class CurrentModel:
    """The registered version a refresh continues, and what it was trained on."""

    name: str
    alias: str
    version: str
    run_name: str | None  # of the Train run that trained it (its checkpoints' folder)
    cfg: ExperimentConfig  # the config that trained it
    manifest: dict  # the manifest of the data version it was trained on (the model folder's copy)
    state: dict  # its weights
    fingerprint: str  # of its vocab files

    @property
    def data(self) -> Location:
        """The prepared version folder it was trained on (sequences/, vocab/)."""
        loc = location(self.cfg.data.output_dir, KEY)
        return loc / self.manifest[DATA_PREFIX] if self.manifest.get(DATA_PREFIX) else loc

    @property
    def cutoff(self) -> int:
        """The last event of its data: a refresh reads what happened after."""
        return int(self.manifest["timestamps"][1])

    @property
    def vocabularies(self) -> set[str]:
        """The vocabularies whose dense ids mean the same items here: its own and every one it extends."""
        return {self.fingerprint, *(self.manifest.get(VOCABULARY) or {}).get("ancestors", [])}


def registered_alias(cfg: ExperimentConfig) -> tuple[str, str]:
    """refresh.model (models:/<name>@<alias>) -> (name, alias)."""
    name, alias = cfg.refresh.model.removeprefix("models:/").split("@")
    return name, alias


def current_model(cfg: ExperimentConfig) -> CurrentModel:
    name, alias = registered_alias(cfg)
    uri = tracking.tracking_uri(cfg)
    client = MlflowClient(uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise RefreshError(f"refresh.model={cfg.refresh.model}: no such registered model and alias in {uri} "
                           f"({str(err).splitlines()[0]})") from None
    with model_folder(f"models:/{name}/{version.version}", uri) as folder:
        model_cfg = ExperimentConfig.model_validate_json((folder / CONFIG).read_text())
        manifest = json.loads((folder / MANIFEST).read_text())
        state = torch.load(folder / WEIGHTS, weights_only=True)
        fingerprint = files_fingerprint(location(folder / VOCAB))
    if model_cfg.model.kind not in ("hstu", "sasrec"):
        raise RefreshError(f"{cfg.refresh.model} is a model.kind={model_cfg.model.kind!r}; a refresh continues "
                           "the retrieval encoders (hstu, sasrec), which the one-pass mode trains")
    run_name = client.get_run(version.run_id).data.tags.get(tracking.RUN_NAME_TAG) if version.run_id else None
    return CurrentModel(name, alias, str(version.version), run_name, model_cfg, manifest, state, fingerprint)


def current_vocabulary(current: CurrentModel) -> Vocabulary:
    """The vocabularies of the data version the model was trained on, checked to be the model's own."""
    folder = current.data / VOCAB
    if not (folder / "items.parquet").is_file():
        raise RefreshError(f"the prepared data {current.data} that "
                           f"version {current.version} was trained on is gone: a refresh needs its histories")
    fingerprint = files_fingerprint(folder)
    if fingerprint != current.fingerprint:
        raise RefreshError(f"{current.data} holds another vocabulary ({fingerprint[:12]}) than version "
                           f"{current.version} was trained on ({current.fingerprint[:12]})")
    record = current.manifest.get(VOCABULARY) or {}
    context = folder / "context.json"
    return Vocabulary(items=read_table(folder / "items.parquet"), users=read_table(folder / "users.parquet"),
                      context=json.loads(context.read_text()) if context.is_file() else {},
                      version=int(record.get("version", 0)), fingerprint=fingerprint, parent=record.get("parent"))


# ----------------------------------------------------------------------------- the new events

@dataclass
class NewEvents:
    """What happened after the cutoff: canonical events (raw ids) and the rejected rows with their reasons;
    input_rows = accepted + rejected. sources: what was read (files and their checksums, the serving log)."""

    events: pa.Table
    rejects: pa.Table
    input_rows: int
    sources: dict


def new_events(cfg: ExperimentConfig, current: CurrentModel, vocab: Vocabulary, log=print) -> NewEvents:
    """The events after the cutoff from the sources refresh names (new files, the serving log), together."""
    parts = []
    if cfg.refresh.files:
        parts.append(new_file_events(cfg, current, log))
    if cfg.refresh.events_db:
        parts.append(serving_log_events(resolve_path(cfg.refresh.events_db), current, vocab, cfg.data.timestamp_max))
    events = pa.concat_tables([p.events for p in parts], promote_options="permissive")
    return NewEvents(events, pa.concat_tables([p.rejects for p in parts]), sum(p.input_rows for p in parts),
                     {k: v for p in parts for k, v in p.sources.items()})


def new_file_events(cfg: ExperimentConfig, current: CurrentModel, log=print) -> NewEvents:
    """The rows of data.source's files that the model's data did not read (its manifest's checksums name the
    files it read), through the prepare's rules, one Ray task per chunk; a row at or before the cutoff is
    rejected (timestamp out of range: the model's past is not rewritten)."""
    if isinstance(cfg.data.source, SyntheticSource):
        raise RefreshError("refresh.files: data.source is a synthetic world, which gets no new files; point "
                           "data.source at the event log (csv, parquet) or set refresh.files: false")
    plan = plan_source(cfg.data)
    read = current.manifest.get("source_checksums_sha256") or {}
    new = {uri: checksum for uri, checksum in plan.checksums.items() if uri not in read}
    changed = sorted(uri for uri, checksum in plan.checksums.items() if read.get(uri, checksum) != checksum)
    if changed:
        log(f"[refresh] warning: {len(changed)} file(s) the model's data read have changed since ({changed[0]}, "
            "...): only new files are read (an event log grows by new files)")
    rules = dataclasses.replace(plan.rules, timestamp_min=max(plan.rules.timestamp_min, current.cutoff + 1))
    catalog = plan.catalog["item_id"].combine_chunks() \
        if plan.catalog is not None and current.manifest.get("item_universe") == "catalog" else None
    chunks = [{"chunk": c} for c in plan.chunks if c.path in new]
    read_parts = run_tasks(read_new_chunk, chunks, rules=rules, catalog=catalog) if chunks else []
    return NewEvents(pa.concat_tables([p[0] for p in read_parts]) if read_parts else _no_events(rules),
                     pa.concat_tables([p[1] for p in read_parts]) if read_parts else REJECT_SCHEMA.empty_table(),
                     sum(p[2] for p in read_parts), {"files": new})


def read_new_chunk(chunk, rules: Rules, catalog: pa.Array | None) -> tuple[pa.Table, pa.Table, int]:
    """One chunk of a new file -> (accepted canonical events, rejects, input rows); item features are not
    kept (a new item's features stay null in the vocabulary)."""
    events, rejects, _, input_rows = read_chunk(chunk, rules, catalog)
    return events, rejects, input_rows


def _no_events(rules: Rules) -> pa.Table:
    id_type = pa.string() if rules.id_kind == "string" else pa.int64()
    return EVENT_SCHEMA.set(0, pa.field("user_id", id_type)).set(1, pa.field("item_id", id_type)).empty_table()


def serving_log_events(path: Path, current: CurrentModel, vocab: Vocabulary, timestamp_max: int) -> NewEvents:
    """The events a Serve app logged (its embedded store: sqlite table `events`, dense item ids of the
    vocabulary the log records, the raw id of an item the model did not know) after the cutoff, as raw-id
    canonical events through the same rules. The log's vocabulary may be the model's or any it extends
    (their ids mean the same items); events at or before the cutoff are the model's past (or consumed by an
    earlier refresh) and are skipped, not rejected."""
    if not path.is_file():
        raise RefreshError(f"refresh.events_db={path}: no such file")
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
            new_item = "new_item" if "new_item" in columns else "NULL"  # a log from before new items were logged
            # one statement, one snapshot of a log the app may be appending to
            logged = db.execute(f"SELECT seq, user, item, action, timestamp, {new_item} FROM events "
                                "ORDER BY seq").fetchall()
    except sqlite3.DatabaseError as err:
        raise RefreshError(f"refresh.events_db={path}: not a genrec events log ({err})") from None
    recorded = meta.get("vocabulary")
    if recorded not in current.vocabularies:
        raise RefreshError(f"refresh.events_db={path}: the log was written for another vocabulary "
                           f"({recorded[:12] if recorded else 'none recorded'}) than version {current.version}'s "
                           f"({current.fingerprint[:12]}) or one it extends: its item ids would name other items")
    actions, bitmask = current.manifest["actions"], current.manifest.get("action_encoding") == "bitmask"
    rules = Rules(id_kind="int" if pa.types.is_integer(vocab.users.schema.field("user_id").type) else "string",
                  timestamp_min=current.cutoff + 1, timestamp_max=timestamp_max,
                  actions=tuple((name, i) for i, name in enumerate(actions)), num_action_ids=len(actions))
    rows = [row for row in logged if row[4] > current.cutoff]
    events, rejects = _log_rows(rows, vocab, bitmask, rules, str(path))
    # the log's rows through this seq are in the refreshed data or were refused: a store serving it skips them
    consumed = {"log_id": meta.get("log_id"), "through_seq": logged[-1][0] if logged else 0}
    return NewEvents(events, rejects, len(rows), {SERVING_LOG: {
        "path": str(path), "events": len(rows), "skipped_at_or_before_cutoff": len(logged) - len(rows),
        **consumed}})


def _log_rows(rows: list, vocab: Vocabulary, bitmask: bool, rules: Rules, where: str) -> tuple[pa.Table, pa.Table]:
    """Logged (seq, user, item, action, timestamp, new item) rows -> (canonical events, rejects): dense item
    ids back to raw ids (a new item's raw id as logged, converted to the vocabulary's id type), one-bit
    action masks back to action ids; a row naming no item or more than one action is rejected with its
    reason before the rules run."""
    seq, item, action, stamp = (np.asarray([r[k] for r in rows], dtype=np.int64).reshape(-1) for k in (0, 2, 3, 4))
    users = pa.array([str(r[1]) for r in rows], pa.string())
    item_type = vocab.items.schema.field("item_id").type
    new_raw = [_raw_id(r[5], item_type) if r[5] is not None else None for r in rows]
    is_new = np.array([n is not None for n in new_raw], dtype=bool)
    known = ((item >= 1) & (item <= vocab.num_items)) | is_new
    one_action = (action > 0) & (action & (action - 1) == 0) if bitmask else np.ones(len(rows), bool)
    index = np.log2(np.where(one_action, action, 1)).astype(np.int64) if bitmask else action
    bad = ~(known & one_action)
    reasons = [_item_reason(r[5], i, vocab.num_items, item_type) if not k else f"action mask {a} is not one action"
               for r, i, a, k in zip((r for r, b in zip(rows, bad) if b), item[bad], action[bad], known[bad])]
    keep = ~bad
    by_seq = {r[0]: dict(zip(("seq", "user", "item", "action", "timestamp", "new_item"), r)) for r in rows}
    raw = lambda numbers: [json.dumps(by_seq[int(n)]) for n in numbers]  # noqa: E731
    old_raw = vocab.items["item_id"].take(pa.array(np.where(is_new, 1, item)[keep] - 1))
    raw_items = pa.array([n if new else o for n, new, o in
                          zip(np.asarray(new_raw, dtype=object)[keep], is_new[keep], old_raw.to_pylist())], item_type)
    columns = {"user_id": users.filter(pa.array(keep)), "item_id": raw_items,
               "timestamp": pa.array(stamp[keep]), "action": pa.array(index[keep])}
    events, rejects, _ = canonical_events(columns, seq[keep], raw, rules, None, where, LOG_FILE_INDEX, seq[bad], reasons)
    return events, rejects


def _raw_id(text: str, item_type: pa.DataType):
    """A new item's raw id as the log holds it (text) -> the vocabulary's id type; None when it does not convert."""
    if not pa.types.is_integer(item_type):
        return text
    try:
        return int(text)
    except ValueError:
        return None


def _item_reason(new_item: str | None, item: int, num_items: int, item_type: pa.DataType) -> str:
    if new_item is not None:
        return f"new item {new_item!r} is not a {item_type} id, as the vocabulary's item ids are"
    return f"item {item} is not a dense id of the model's vocabulary (1..{num_items})"


# ----------------------------------------------------------------------------- the refreshed data

def append_sequences(old: pa.Table, new: pa.Table) -> pa.Table:
    """Sequence rows (user, items, actions, timestamps, values, context columns) with each user's `new` events
    after their `old` ones (every new event is later than every old one), users of `new` only added with
    context 0 (unknown); rows in user order."""
    old, new = old.combine_chunks(), new.combine_chunks()
    users = np.concatenate([old["user"].to_numpy(), new["user"].to_numpy()])
    order = np.lexsort((np.repeat([0, 1], [old.num_rows, new.num_rows]), users))  # by user, old row first
    users = users[order]
    first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.concatenate([list_lengths(old), list_lengths(new)])[order]
    row_lengths = np.add.reduceat(lengths, first) if len(first) else np.zeros(0, np.int64)
    offsets = pa.array(offsets_from_lengths(row_lengths).astype(np.int32))
    columns = {"user": pa.array(users[first].astype(np.int32))}
    for name in LIST_COLUMNS:
        parts = [old[name].combine_chunks(), new[name].combine_chunks()]
        starts = np.concatenate([parts[0].offsets.to_numpy()[:-1],
                                 parts[1].offsets.to_numpy()[:-1] + len(parts[0].values)])[order]
        values = pa.concat_arrays([p.values.cast(old.schema.field(name).type.value_type) for p in parts])
        columns[name] = pa.ListArray.from_arrays(offsets, values.take(pa.array(concat_ranges(starts, lengths))))
    in_old = order[first] < old.num_rows  # a user's first row is their old one, if they have one
    for name in old.column_names[len(columns):]:
        context = np.zeros(len(first), np.int32)
        context[in_old] = old[name].to_numpy()[order[first][in_old]]
        columns[name] = pa.array(context)
    return pa.table(columns, schema=old.schema)


def publish_window(current: CurrentModel, vocab: Vocabulary, new: NewEvents, out: Location) -> dict:
    """The prepared folder `out` of the refreshed data (written, the manifest last, as a prepare publishes);
    returns its manifest. A folder already published for the same parent and window is reused."""
    if (out / MANIFEST).is_file():
        return json.loads((out / MANIFEST).read_text())
    grown = extend_vocabulary(vocab, new.events, where="the new events")
    dense = pa.table({"user": dense_index(grown, "users", new.events["user_id"]).cast(pa.int32()),
                      "item": dense_index(grown, "items", new.events["item_id"]).cast(pa.int32()),
                      **{k: new.events[k] for k in ("timestamp", "action", "value", "source_order")}})
    window, stats = build_sequences(dense, current.manifest.get("action_encoding") == "bitmask")
    old = pa.concat_tables(read_table(f) for f in (current.data / SEQUENCES).list_files(suffixes=(".parquet",)))
    sequences = append_sequences(old, window)
    splits, counts = make_splits(sequences, TimeSplit(kind="time", cutoff=current.cutoff), current.cutoff)
    version = out / version_name()
    try:
        for name, table in {SEQUENCES: sequences, **splits}.items():
            write_table(table, version / name / PART, use_dictionary=False, compression="zstd")  # as a prepare does
        if new.rejects.num_rows:
            write_table(new.rejects, version / REJECTS / PART)
        fingerprint = write_vocabulary(grown, version / VOCAB)
        record = {"parent": {"model": f"models:/{current.name}/{current.version}", "data": current.data.uri},
                  "window": [int(v) for v in pc.min_max(new.events["timestamp"]).as_py().values()],
                  "input_rows": new.input_rows, "accepted": new.events.num_rows, "rejected": new.rejects.num_rows,
                  "rejected_by_reason": rejects_by_reason(version),
                  "window_events": int(pc.sum(pc.list_value_length(window["items"])).as_py() or 0),
                  "duplicates_dropped": stats["duplicates"], "merged_into_bitmask": stats["merged"],
                  "new_items": grown.num_items - vocab.num_items, "new_users": grown.num_users - vocab.num_users,
                  "sources": new.sources}
        manifest = window_manifest(current, vocab, grown, fingerprint, sequences, counts, record)
        (out / MANIFEST).write_text(json.dumps({**manifest, DATA_PREFIX: version.name}, indent=1, sort_keys=True))
    except BaseException:
        version.delete()  # no manifest names it: nothing half written stays
        raise
    return json.loads((out / MANIFEST).read_text())


def window_manifest(current: CurrentModel, vocab: Vocabulary, grown: Vocabulary, fingerprint: str,
                    sequences: pa.Table, counts: dict, record: dict) -> dict:
    """The parent's manifest (actions, encodings, context features, ...) with what the refreshed data is: its
    vocabulary record (plus `ancestors`, every vocabulary it extends: a serving log of any of them reads), its
    sequences' counts and time span, the time split at the cutoff, the files read so far, and the refresh."""
    parent = current.manifest
    ancestors = (parent.get(VOCABULARY) or {}).get("ancestors", [])
    manifest = {k: v for k, v in parent.items() if k not in ("synthetic_oracle", "warnings")}  # the first prepare's
    manifest.update(vocabulary_manifest(grown, fingerprint))
    manifest[VOCABULARY]["ancestors"] = ancestors if grown is vocab else [vocab.fingerprint, *ancestors]
    stamps = sequences["timestamps"].combine_chunks().values
    split = TimeSplit(kind="time", cutoff=current.cutoff).model_dump()
    files = record["sources"].get("files", {})
    if SERVING_LOG in record["sources"]:  # else the parent's record stands: its rows are in this data too
        log = record["sources"][SERVING_LOG]
        manifest[SERVING_LOG] = {"log_id": log["log_id"], "through_seq": log["through_seq"]}
    manifest.update({"users": sequences.num_rows, "sequence_events": len(stamps),
                     "timestamps": [pc.min(stamps).as_py(), pc.max(stamps).as_py()],
                     "split": {**split, "cutoff_used": current.cutoff}, **counts, "warnings": [],
                     "source_checksums_sha256": {**parent.get("source_checksums_sha256", {}), **files},
                     "refresh": record})
    return manifest


# ----------------------------------------------------------------------------- the starting state

def starting_state(current: CurrentModel, num_items: int, log=print) -> dict:
    """{"model": the current weights, item table grown to num_items (new rows as a new table's),
    "optimizer": its AdamW state grown alike (old moments kept, zero for new rows), or None} (loop.StartingPoint)."""
    model = build_model(current.cfg, current.manifest)
    model.load_state_dict(current.state)
    moments = parent_optimizer_state(current, log)
    optimizer = None
    if moments is not None:
        t = current.cfg.train
        tables = [model.get_parameter(f"{name}.weight") for name in item_table_names(model)]
        optimizer = build_optimizer(optimizer_groups(model, []), tables, t.embedding_optimizer, lr=t.lr,
                                    betas=t.betas, weight_decay=t.weight_decay)
        optimizer.load_state_dict(moments)
    replaced = grow_item_tables(model, num_items)
    if optimizer is not None:
        grow_optimizer_rows(optimizer, replaced)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None}


def parent_optimizer_state(current: CurrentModel, log=print) -> dict | None:
    """The optimizer state of the run that trained the version, from its last checkpoint, when that checkpoint
    holds exactly the registered weights (a one-pass run or a refresh registers its last model; an epochs run
    its best epoch, whose moments are gone); else None, and the refresh starts the moments fresh."""
    folder = location(current.cfg.train.storage_path, "train.storage_path") / (current.run_name or "")
    states = [f for f in folder.list_files() if f.name == STATE_FILE and f.parent.name.startswith("checkpoint_")] \
        if current.run_name and folder.is_dir() else []
    why = f"no checkpoint of its run in {folder}" if current.run_name else "no Train run is recorded for it"
    if states:
        state = torch.load(io.BytesIO(max(states, key=lambda f: f.parent.name).read_bytes()), weights_only=True)
        weights = state.get("model")
        same = weights is not None and weights.keys() == current.state.keys() and \
            all(torch.equal(weights[k], v) for k, v in current.state.items())
        if same:
            log(f"[refresh] optimizer: AdamW moments of {folder.name}'s last checkpoint, grown with the table")
            return state["optimizer"]
        why = "its run's last checkpoint holds other weights (an epochs run registers its best epoch) or is sharded"
    log(f"[refresh] optimizer: fresh moments ({why})")
    return None


def unknown_rows_zeroed(grown: dict, current: dict) -> dict:
    """The grown weights with the rows of the items `current` (the same model before growth) lacks set to 0:
    what the frozen model ranks with. It never saw those items; a zero row scores 0 for every user, where a
    starting row's direction is a guess that would count against it in the gate (genrec.model.growth)."""
    key = state_item_key(grown)
    table = grown[key].clone()
    table[current[key].size(0):] = 0
    return {**grown, key: table}


def score_windows(cfg: ExperimentConfig, weights: dict, window_start: int) -> list[dict]:
    """The current model, frozen (`weights`: its grown table, unknown_rows_zeroed), ranks each chunk's events as the one-pass run
    ranks them (the same targets, eval.window_users sample, ties and batches): one `window/*` dict per chunk.
    cfg: the refresh run's, with absolute paths (trainer.workers_view): it runs as a Ray task."""
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.train.cpus_per_worker)))
    model = build_model(cfg)
    model.load_state_dict(weights)
    windows = StreamWindows(read_split(cfg.data.output_dir, SEQUENCES), cfg.train.window_days, window_start)
    spec, ev = batch_spec(cfg), cfg.eval
    scored = []
    for index in range(len(windows)):
        table, targets = windows.window(index)
        scored.append(evaluate_window(model, table, spec, ev.batch_size, ev.ties, ev.window_users)
                      if targets else {"window/targets": 0.0})
    return scored


# ----------------------------------------------------------------------------- the gate and the registry

@dataclass(frozen=True)
class Gate:
    """The gate's decision: the new and the current model's metric on the events of chunks 2..N."""

    passed: bool
    metric: str
    candidate: float | None
    current: float | None
    targets: int
    reason: str


def judge(candidate: list[dict], current: list[dict], metric: str, margin: float) -> Gate:
    """candidate: the run's per-chunk metrics (each chunk ranked before it was trained on); current: the frozen
    model's on the same chunks. Compared on chunks 2..N, target-weighted: chunk 1 is ranked before the new
    model trained (the current weights in both, but for the new items' rows: starting rows in the run, zero
    rows in the frozen model). Passes when the new model's value is at least (1 - margin) x the current one's."""
    key = f"window/{metric}"
    pairs = [(c, k) for c, k in zip(candidate[1:], current[1:]) if k.get("window/targets")]
    if any(c.get("window/targets") != k["window/targets"] for c, k in pairs):
        raise RuntimeError("the new and the current model ranked different events")  # a bug, not a user error
    targets = int(sum(k["window/targets"] for _, k in pairs))
    if not targets:
        return Gate(False, metric, None, None, 0, f"no evidence: chunks 2..{len(current)} of the window hold no "
                    "event to rank (chunk 1 is ranked before the new model trained at all)")
    new, old = (sum(row[key] * k["window/targets"] for row, (_, k) in zip(rows, pairs)) / targets
                for rows in ([c for c, _ in pairs], [k for _, k in pairs]))
    least = old * (1 - margin)
    text = f"{metric} {new:.4f} (new) vs {old:.4f} (current) on {targets:,} events of chunks 2..{len(current)}"
    if new >= least:
        return Gate(True, metric, new, old, targets, f"{text}: {'not worse' if new >= old else 'within the margin'}")
    return Gate(False, metric, new, old, targets, f"{text}: worse by more than refresh.gate_margin={margin:g} "
                f"(the least accepted is {least:.4f})")


def lineage(current: CurrentModel, manifest: dict, data: Location, gate: Gate) -> dict:
    """The tags of the new version (and its run): parent version, data window, vocabulary, gate."""
    record, vocab = manifest["refresh"], manifest[VOCABULARY]
    start, end = record["window"]
    return {"genrec.parent_version": current.version, "genrec.parent_model": record["parent"]["model"],
            "genrec.alias": current.alias, "genrec.window_start": start, "genrec.window_end": end,
            "genrec.window": f"[{_utc(start)}, {_utc(end)}]", "genrec.data": data.uri,
            "genrec.data_version": manifest[DATA_PREFIX], "genrec.vocabulary_version": vocab["version"],
            "genrec.vocabulary_fingerprint": vocab["fingerprint"], "genrec.vocabulary_parent": vocab["parent"],
            "genrec.new_items": record["new_items"], "genrec.new_users": record["new_users"],
            "genrec.gate": "passed" if gate.passed else "refused", "genrec.gate_reason": gate.reason}


def promote(cfg: ExperimentConfig, current: CurrentModel, version: str, run_id: str, tags: dict,
            gate: Gate) -> tuple[bool, str]:
    """Tag the new version and its run with `tags`; move the alias to it when the gate passed and the alias
    still names the parent (a refresh never moves an alias someone else moved meanwhile). -> (moved, why)."""
    client = MlflowClient(tracking.tracking_uri(cfg))
    for key, value in tags.items():
        client.set_model_version_tag(current.name, version, key, str(value))
        client.set_tag(run_id, key, str(value)[:5000])
    if not gate.passed:
        return False, gate.reason
    now = client.get_model_version_by_alias(current.name, current.alias).version
    if str(now) != current.version:
        return False, f"the alias moved to version {now} during the refresh; {gate.reason}"
    client.set_registered_model_alias(current.name, current.alias, version)
    return True, gate.reason


def _utc(seconds: int) -> str:
    return f"{datetime.fromtimestamp(seconds, timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


# ----------------------------------------------------------------------------- the whole refresh

def refresh(cfg: ExperimentConfig, log=print) -> dict:
    """One refresh of cfg.refresh.model (the module's docstring) -> {"outcome": promoted | kept | nothing new,
    "version": the new version (the current one when nothing was new), "reason", "gate", "window", ...}."""
    import ray

    current = current_model(cfg)
    vocab = current_vocabulary(current)
    log(f"[refresh] {cfg.refresh.model} is version {current.version} ({current.cfg.model.kind}, {vocab.num_items:,} "
        f"items, {vocab.num_users:,} users), trained on data up to {_utc(current.cutoff)}")
    new = new_events(cfg, current, vocab, log)
    log(events_line(new))
    if not new.events.num_rows:
        if new.input_rows:
            raise RefreshError(f"all {new.input_rows:,} new rows were rejected (e.g. {new.rejects['reason'][0].as_py()}); "
                               "nothing to train on")
        log(f"[refresh] nothing new since {_utc(current.cutoff)}: {cfg.refresh.model} stays version {current.version}")
        return {"outcome": NOTHING_NEW, "version": current.version, "reason": "no new events"}
    end = int(pc.max(new.events["timestamp"]).as_py())
    window_name = f"{current.name}-v{current.version}-{datetime.fromtimestamp(end, timezone.utc):%Y%m%dT%H%M%SZ}"
    data = location(cfg.refresh.output_dir, "refresh.output_dir") / window_name
    manifest = publish_window(current, vocab, new, data)
    run_name = f"{window_name}-{training_digest(cfg)}"
    log(window_line(manifest, data))
    run_cfg = refreshed_config(cfg, current, data, manifest, run_name)
    state = starting_state(current, manifest["num_items"], log)
    start = StartingPoint(write_starting_state(run_cfg, run_name, state), manifest["refresh"]["window"][0])
    # the frozen model ranks the chunks in a task of its own (a training worker's CPUs) while the run trains
    frozen = unknown_rows_zeroed(state["model"], current.state)
    scoring = ray.remote(score_windows).options(num_cpus=cfg.train.cpus_per_worker, max_retries=1) \
        .remote(workers_view(run_cfg), frozen, start.window_start)
    result = fit(run_cfg, log=log, start=start)
    current_windows = ray.get(scoring)
    candidate_windows = [{k: v for k, v in h.items() if k.startswith("window/")} for h in result["history"]]
    gate = judge(candidate_windows, current_windows, cfg.refresh.gate_metric, cfg.refresh.gate_margin)
    log_current_windows(run_cfg, result["mlflow_run_id"], current_windows)
    moved, why = promote(cfg, current, result["version"], result["mlflow_run_id"],
                         lineage(current, manifest, data, gate), gate)
    log(f"[refresh] gate passed: {current.alias} -> version {result['version']} ({why})" if moved else
        f"[refresh] kept: {current.alias} stays on version {current.version}; version {result['version']} "
        f"is registered, not promoted: {why}")
    return {"outcome": PROMOTED if moved else KEPT, "version": str(result["version"]), "parent_version": current.version,
            "alias": f"models:/{current.name}@{current.alias}", "reason": why, "gate": dataclasses.asdict(gate),
            "window": manifest["refresh"]["window"], "data": data.uri, "run_name": run_name,
            "new_items": manifest["refresh"]["new_items"], "new_users": manifest["refresh"]["new_users"],
            "history": result["history"], "current_windows": current_windows}


def refreshed_config(cfg: ExperimentConfig, current: CurrentModel, data: Location, manifest: dict,
                     run_name: str) -> ExperimentConfig:
    """The refresh run's config: the job's (training, evaluation, tracking, Ray) with the model's shape (model,
    batching, ranking: from the config that trained it), the refreshed data, the one_pass mode over
    refresh.chunks equal chunks of the window, and the model's registered name."""
    start, end = manifest["refresh"]["window"]
    tree = cfg.model_dump(mode="json")
    tree.update({key: getattr(current.cfg, key).model_dump(mode="json") for key in ("model", "batching", "ranking")})
    tree["data"]["output_dir"] = data.uri
    tree["train"].update(mode="one_pass", data_mode="replicated", train_on="train", run_name=run_name,
                         window_days=(end - start + 1) / cfg.refresh.chunks / DAY)
    tree["tracking"]["registered_model"] = current.name
    return ExperimentConfig.model_validate(tree)


def training_digest(cfg: ExperimentConfig) -> str:
    """8 hex digits of the training and evaluation settings: part of the run's name, so that running the same
    refresh again resumes its run (after a crash) or re-judges its model (another gate), and one with other
    training settings trains anew."""
    settings = {"train": cfg.train.model_dump(mode="json", exclude={"run_name"}), "eval": cfg.eval.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def write_starting_state(cfg: ExperimentConfig, run_name: str, state: dict) -> str:
    """The starting state into the run's folder (where its checkpoints go: every worker reaches it)."""
    loc = location(cfg.train.storage_path, "train.storage_path") / run_name / STARTING_STATE
    buffer = io.BytesIO()
    torch.save(state, buffer)
    loc.write_bytes(buffer.getvalue())
    return loc.uri


def log_current_windows(cfg: ExperimentConfig, run_id: str, windows: list[dict]) -> None:
    """The frozen model's per-chunk metrics beside the run's own, as current/window/<metric> (step = chunk)."""
    from mlflow.entities import Metric

    metrics = [Metric(tracking.metric_key(f"current/{k}"), float(v), 0, step + 1)
               for step, scored in enumerate(windows) for k, v in scored.items()]
    if metrics:
        MlflowClient(tracking.tracking_uri(cfg)).log_batch(run_id, metrics=metrics)


def events_line(new: NewEvents) -> str:
    """What was read: files and the serving log, rows accepted and rejected."""
    files = new.sources.get("files")
    served = new.sources.get("serving_log")
    parts = ([f"{len(files)} new file(s)"] if files is not None else []) + \
        ([f"the serving log ({served['events']:,} events after the cutoff, {served['skipped_at_or_before_cutoff']:,} "
          "at or before it skipped)"] if served else [])
    return (f"[refresh] new events: {' and '.join(parts)}: {new.input_rows:,} rows, {new.events.num_rows:,} accepted, "
            f"{new.rejects.num_rows:,} rejected")


def window_line(manifest: dict, data: Location) -> str:
    record, vocab = manifest["refresh"], manifest[VOCABULARY]
    reasons = ", ".join(f"{k} ({v:,})" for k, v in record["rejected_by_reason"].items())
    return (f"[refresh] window [{_utc(record['window'][0])}, {_utc(record['window'][1])}]: {record['window_events']:,} "
            f"events; vocabulary version {vocab['version']} (+{record['new_items']:,} items, +{record['new_users']:,} "
            f"users){f'; rejected: {reasons}' if reasons else ''}; prepared at {data}")
