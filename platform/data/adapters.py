"""Adapters: a source (MovieLens `::` files, MovieLens CSV, generic CSV/Parquet logs) ->
canonical events (schema.EVENT_SCHEMA) + rejects (schema.REJECT_SCHEMA).

Work is planned on the driver as `Chunk`s (a byte range of a text file, or a row
group of a Parquet file) so that Ray tasks can parse them in parallel, and so that
every row keeps its file and row number: the tie-break for equal timestamps
(source order) and the address printed for a rejected row.

Every input row ends up in exactly one of the two outputs: input = accepted + rejected.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import (
    ActionsConfig,
    ColumnMapping,
    CsvSource,
    DataConfig,
    MovieLensCsvSource,
    MovieLensSource,
    ParquetSource,
    SyntheticSource,
    resolve_path,
)
from ..errors import GenrecError
from .schema import EVENT_SCHEMA, REJECT_SCHEMA, source_order


class SourceError(GenrecError, ValueError):
    """A source that cannot be read at all (missing file, empty file, wrong format)."""


MOVIELENS_ACTIONS = ["rating_1", "rating_2", "rating_3", "rating_4", "rating_5"]
INTEGER = re.compile(r"-?\d+\Z")
NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\Z")


@dataclass(frozen=True)
class TextFormat:
    """How to split one text line into the canonical fields."""

    kind: str  # "dat" (`::` separated) or "csv"
    num_fields: int
    positions: dict  # canonical field -> column index
    delimiter: str = ","
    timestamp_unit: str = "s"
    action_ids: dict | None = None  # raw action value -> action id; None: derive from rating
    id_kind: str = "int"  # raw ids: "int" or "string"


@dataclass(frozen=True)
class Chunk:
    file_index: int
    path: str
    kind: str  # "text" or "parquet"
    start: int = 0  # byte offset (text) / row group (parquet)
    stop: int = 0
    first_row: int = 1  # 1-based number of the chunk's first row
    text_format: TextFormat | None = None
    parquet_columns: dict = field(default_factory=dict)


@dataclass
class SourcePlan:
    """Everything the pipeline needs to know about a source before reading it."""

    chunks: list[Chunk]
    actions: list[str]
    merge_actions: bool
    checksums: dict  # file -> sha256 of its first and last MiB plus size (cheap, detects edits)
    catalog: pa.Table | None = None  # item_id + item features (movies.dat / movies.csv / items.parquet)
    users: pa.Table | None = None  # user_id + context features
    context_columns: list[str] = field(default_factory=list)
    action_lookup: dict | None = None  # Parquet: raw action value -> id


# ----------------------------------------------------------------------------- helpers

def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(f"{what} not found: {path}")
    if not path.is_file():
        raise SourceError(f"{what} is not a file: {path}")
    if path.stat().st_size == 0:
        raise SourceError(f"{what} is empty: {path}")
    return path


def _files_in(path: Path, suffix: str, what: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if not files:
            raise SourceError(f"{what}: no *{suffix} files in folder {path}")
        return [_require_file(p, what) for p in files]
    return [_require_file(path, what)]


def file_checksum(path: Path) -> str:
    """sha256 of the whole file, streamed (the manifest's source checksum)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _text_chunks(file_index: int, path: Path, fmt: TextFormat, chunk_bytes: int, skip_header: bool) -> list[Chunk]:
    """Split a text file at line ends into ~chunk_bytes pieces, counting lines to number rows."""
    chunks = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        start, line = 0, 1
        if skip_header:
            header = f.readline()
            start, line = len(header), 2
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()  # finish the line we landed in
            stop = min(f.tell(), size)
            f.seek(start)
            lines_in_chunk = f.read(stop - start).count(b"\n")
            chunks.append(Chunk(file_index, str(path), "text", start, stop, line, text_format=fmt))
            start, line = stop, line + lines_in_chunk
    return chunks


def _csv_header(path: Path, delimiter: str) -> list[str]:
    with open(path, "rb") as f:
        first = f.readline()
    try:
        return next(csv.reader([first.decode("utf-8-sig").rstrip("\r\n")], delimiter=delimiter))
    except (UnicodeDecodeError, StopIteration):
        raise SourceError(f"{path}: the first line is not a readable CSV header") from None


def _positions(header: list[str], columns: ColumnMapping, path: Path) -> dict:
    wanted = {"user_id": columns.user_id, "item_id": columns.item_id, "timestamp": columns.timestamp}
    if columns.action:
        wanted["action"] = columns.action
    if columns.value:
        wanted["value"] = columns.value
    missing = {k: v for k, v in wanted.items() if v not in header}
    if missing:
        names = ", ".join(f"{v!r} (for {k})" for k, v in missing.items())
        raise SourceError(f"{path}: column {names} not in header {header}; set data.source.columns")
    return {k: header.index(v) for k, v in wanted.items()}


def action_ids(actions: ActionsConfig) -> dict:
    ids = {name: i for i, name in enumerate(actions.names)}
    ids.update({raw: ids[name] for raw, name in actions.mapping.items()})
    return ids


# ----------------------------------------------------------------------------- planning

def _plan_movielens(source: MovieLensSource, cfg: DataConfig) -> SourcePlan:
    root = resolve_path(source.path)
    if not root.is_dir():
        raise SourceError(f"MovieLens folder not found: {root}")
    ratings = _require_file(root / source.ratings_file, "MovieLens ratings file")
    with open(ratings, "rb") as f:
        if b"::" not in f.readline():
            raise SourceError(f"{ratings}: not a MovieLens '::' file (first line has no '::')")
    fmt = TextFormat("dat", 4, {"user_id": 0, "item_id": 1, "value": 2, "timestamp": 3})
    catalog = read_movies_dat(_require_file(root / source.movies_file, "MovieLens movies file"))
    users = read_users_dat(_require_file(root / source.users_file, "MovieLens users file")) if source.users_file else None
    return SourcePlan(
        chunks=_text_chunks(0, ratings, fmt, cfg.chunk_bytes, skip_header=False),
        actions=MOVIELENS_ACTIONS,
        merge_actions=False,
        checksums={str(ratings): file_checksum(ratings)},
        catalog=catalog,
        users=users,
        context_columns=[c for c in (users.column_names[1:] if users is not None else [])],
    )


def _plan_movielens_csv(source: MovieLensCsvSource, cfg: DataConfig) -> SourcePlan:
    root = resolve_path(source.path)
    ratings = _require_file(root / source.ratings_file, "MovieLens ratings.csv")
    header = _csv_header(ratings, ",")
    positions = _positions(header, ColumnMapping(user_id="userId", item_id="movieId", timestamp="timestamp", value="rating"), ratings)
    fmt = TextFormat("csv", len(header), positions)
    catalog = read_movies_csv(_require_file(root / source.movies_file, "MovieLens movies.csv")) if source.movies_file else None
    return SourcePlan(
        chunks=_text_chunks(0, ratings, fmt, cfg.chunk_bytes, skip_header=True),
        actions=[f"rating_{h}" for h in ("0.5", "1", "1.5", "2", "2.5", "3", "3.5", "4", "4.5", "5")],
        merge_actions=False,
        checksums={str(ratings): file_checksum(ratings)},
        catalog=catalog,
    )


def _plan_csv(source: CsvSource, cfg: DataConfig) -> SourcePlan:
    files = _files_in(resolve_path(source.path), ".csv", "CSV event log")
    chunks = []
    for index, path in enumerate(files):
        header = _csv_header(path, source.delimiter)
        positions = _positions(header, source.columns, path)
        fmt = TextFormat(
            "csv", len(header), positions, source.delimiter, source.timestamp_unit,
            action_ids(source.actions) if source.columns.action else None, id_kind=source.columns.id_type,
        )
        chunks += _text_chunks(index, path, fmt, cfg.chunk_bytes, skip_header=True)
    return SourcePlan(
        chunks=chunks,
        actions=source.actions.names,
        merge_actions=source.actions.merge_same_impression,
        checksums={str(p): file_checksum(p) for p in files},
    )


def _plan_parquet(source: ParquetSource, cfg: DataConfig) -> SourcePlan:
    files = _files_in(resolve_path(source.path), ".parquet", "Parquet event log")
    chunks = []
    for index, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowInvalid, OSError) as err:
            raise SourceError(f"{path}: not a readable Parquet file ({err})") from None
        names = meta.schema.names
        mapping = source.columns
        wanted = {k: getattr(mapping, k) for k in ("user_id", "item_id", "timestamp", "action", "value")}
        wanted = {k: v for k, v in wanted.items() if v}
        missing = {k: v for k, v in wanted.items() if v not in names}
        if missing:
            names_missing = ", ".join(f"{v!r} (for {k})" for k, v in missing.items())
            raise SourceError(f"{path}: column {names_missing} not in {names}; set data.source.columns")
        row = 1
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            chunks.append(Chunk(index, str(path), "parquet", group, group + 1, row, parquet_columns=wanted))
            row += n
    users = None
    if source.users_file:
        users_path = _require_file(resolve_path(source.users_file), "users file")
        users = pq.read_table(users_path)
        if "user_id" not in users.column_names:
            raise SourceError(f"{users_path}: needs a user_id column, has {users.column_names}")
    return SourcePlan(
        chunks=chunks,
        actions=source.actions.names,
        merge_actions=source.actions.merge_same_impression,
        checksums={str(p): file_checksum(p) for p in files},
        users=users,
        context_columns=users.column_names[1:] if users is not None else [],
        action_lookup=action_ids(source.actions) if source.columns.action else None,
    )


def synthetic_as_parquet(source: SyntheticSource, folder: Path) -> ParquetSource:
    """The generated folder, described as the Parquet log it is."""
    from .synthetic import EVENTS_DIR, USERS_FILE

    names = list(source.action_rates)
    return ParquetSource(
        kind="parquet",
        path=str(folder / EVENTS_DIR),
        columns=ColumnMapping(action="action"),
        actions=ActionsConfig(names=names, merge_same_impression=True),
        users_file=str(folder / USERS_FILE),
    )


def plan_source(cfg: DataConfig) -> SourcePlan:
    """Check the source exists and has the expected shape, and cut it into chunks."""
    source = cfg.source
    if isinstance(source, SyntheticSource):
        from .synthetic import ITEMS_FILE, generate

        folder = generate(source)
        plan = _plan_parquet(synthetic_as_parquet(source, folder), cfg)
        plan.catalog = pq.read_table(folder / ITEMS_FILE)
        return plan
    planners = {
        MovieLensSource: _plan_movielens,
        MovieLensCsvSource: _plan_movielens_csv,
        CsvSource: _plan_csv,
        ParquetSource: _plan_parquet,
    }
    plan = planners[type(source)](source, cfg)
    if not plan.chunks:
        raise SourceError(f"source has no rows: {source.path}")
    return plan


# ----------------------------------------------------------------------------- side tables

def _dat_lines(path: Path, encoding: str) -> list[list[str]]:
    text = path.read_bytes().decode(encoding)
    return [line.split("::") for line in text.splitlines() if line]


def read_movies_dat(path: Path) -> pa.Table:
    """movies.dat (latin-1): MovieID::Title::Genres -> item_id, title, genres list."""
    rows = _dat_lines(path, "latin-1")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 3 or not INTEGER.match(r[0])]
    if bad:
        raise SourceError(f"{path}: lines {bad[:5]} are not MovieID::Title::Genres")
    return pa.table(
        {
            "item_id": pa.array([int(r[0]) for r in rows], pa.int64()),
            "title": [r[1] for r in rows],
            "genres": [r[2].split("|") for r in rows],
        }
    )


def read_users_dat(path: Path) -> pa.Table:
    """users.dat: UserID::Gender::Age::Occupation::Zip-code -> user_id + context features."""
    rows = _dat_lines(path, "utf-8")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 5 or not INTEGER.match(r[0])]
    if bad:
        raise SourceError(f"{path}: lines {bad[:5]} are not UserID::Gender::Age::Occupation::Zip-code")
    return pa.table(
        {
            "user_id": pa.array([int(r[0]) for r in rows], pa.int64()),
            "gender": [r[1] for r in rows],
            "age": [r[2] for r in rows],
            "occupation": [r[3] for r in rows],
            "zip": [r[4] for r in rows],
        }
    )


def read_movies_csv(path: Path) -> pa.Table:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return pa.table(
        {
            "item_id": pa.array([int(r["movieId"]) for r in rows], pa.int64()),
            "title": [r["title"] for r in rows],
            "genres": [r["genres"].split("|") for r in rows],
        }
    )


# ----------------------------------------------------------------------------- reading chunks

class _Collector:
    """Accumulates accepted rows and rejects of one chunk."""

    def __init__(self, chunk: Chunk, id_type):
        self.chunk = chunk
        self.cols = {"user_id": [], "item_id": [], "timestamp": [], "action": [], "value": [], "row": []}
        self.rejects = {"row_number": [], "raw": [], "reason": []}
        self.id_type = id_type

    def reject(self, row: int, raw: str, reason: str):
        self.rejects["row_number"].append(row)
        self.rejects["raw"].append(raw)
        self.rejects["reason"].append(reason)

    def events(self) -> pa.Table:
        c = self.cols
        rows = np.asarray(c["row"], dtype=np.int64)
        return pa.table(
            {
                "user_id": pa.array(c["user_id"], self.id_type),
                "item_id": pa.array(c["item_id"], self.id_type),
                "timestamp": pa.array(c["timestamp"], pa.int64()),
                "action": pa.array(c["action"], pa.int32()),
                "value": pa.array(c["value"], pa.float32()),
                "source_order": pa.array(source_order(self.chunk.file_index, rows)),
            },
            schema=EVENT_SCHEMA.set(0, pa.field("user_id", self.id_type)).set(1, pa.field("item_id", self.id_type)),
        )

    def rejects_table(self) -> pa.Table:
        n = len(self.rejects["reason"])
        return pa.table(
            {"source_file": [self.chunk.path] * n, **self.rejects}, schema=REJECT_SCHEMA
        )


def _parse_text(chunk: Chunk, cfg_ts: tuple[int, int], known_items: set | None):
    fmt = chunk.text_format
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.stop - chunk.start)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    string_ids = fmt.id_kind == "string"
    out = _Collector(chunk, pa.string() if string_ids else pa.int64())
    pos = fmt.positions
    ts_lo, ts_hi = cfg_ts
    ts_div = 1000 if fmt.timestamp_unit == "ms" else 1
    for offset, raw_bytes in enumerate(lines):
        row = chunk.first_row + offset
        raw_bytes = raw_bytes[:-1] if raw_bytes.endswith(b"\r") else raw_bytes
        try:
            line = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            out.reject(row, raw_bytes.decode("utf-8", "backslashreplace"), f"bad encoding: not UTF-8 at byte {err.start}")
            continue
        if fmt.kind == "dat":
            fields = line.split("::")
        else:
            fields = next(csv.reader([line], delimiter=fmt.delimiter), [])
        if len(fields) != fmt.num_fields:
            out.reject(row, line, f"wrong number of fields: {len(fields)}, expected {fmt.num_fields}")
            continue
        reason = None
        values = {}
        for name in ("user_id", "item_id", "timestamp"):
            text = fields[pos[name]].strip()
            if not text:
                reason = f"missing field {name}"
                break
            if string_ids and name != "timestamp":
                values[name] = text
            elif not INTEGER.match(text):
                reason = f"{name} is not an integer: {text!r}"
                break
            else:
                values[name] = int(text)
        if reason is None:
            ts = values["timestamp"] // ts_div
            if not ts_lo <= ts <= ts_hi:
                reason = f"timestamp out of range [{ts_lo}, {ts_hi}]: {values['timestamp']}"
            values["timestamp"] = ts
        value = float("nan")
        if reason is None and "value" in pos:
            text = fields[pos["value"]].strip()
            if not text:
                reason = "missing field value"
            elif not NUMBER.match(text):
                reason = f"value is not a number: {text!r}"
            else:
                value = float(text)
        action = 0
        if reason is None:
            if fmt.action_ids is not None:
                text = fields[pos["action"]].strip()
                if text not in fmt.action_ids:
                    reason = f"unknown action {text!r}; known: {sorted(fmt.action_ids)}"
                else:
                    action = fmt.action_ids[text]
            elif "value" in pos:  # MovieLens: the rating is the action
                action = _rating_action(value, fmt)
                if action is None:
                    reason = f"rating out of range: {fields[pos['value']]!r}"
        if reason is None and known_items is not None and values["item_id"] not in known_items:
            reason = f"item_id {values['item_id']} is not in the item catalog"
        if reason is not None:
            out.reject(row, line, reason)
            continue
        for name in ("user_id", "item_id", "timestamp"):
            out.cols[name].append(values[name])
        out.cols["action"].append(action)
        out.cols["value"].append(value)
        out.cols["row"].append(row)
    return out.events(), out.rejects_table(), len(lines)


def _rating_action(rating: float, fmt: TextFormat):
    if fmt.kind == "dat":  # ML-1M: integer stars 1..5
        return int(rating) - 1 if rating in (1, 2, 3, 4, 5) else None
    half_steps = rating * 2  # ML-20M/25M: 0.5 .. 5 in half stars
    return int(half_steps) - 1 if half_steps == int(half_steps) and 1 <= half_steps <= 10 else None


def _raw_rows(table: pa.Table, mask: np.ndarray) -> list[str]:
    return [json.dumps(r, default=str) for r in table.filter(pa.array(mask)).to_pylist()]


def _parse_parquet(chunk: Chunk, cfg_ts, known_items: set | None, actions: dict | None, ts_unit: str):
    cols = chunk.parquet_columns
    table = pq.ParquetFile(chunk.path).read_row_group(chunk.start, columns=sorted(set(cols.values())))
    n = table.num_rows
    rows = np.arange(chunk.first_row, chunk.first_row + n, dtype=np.int64)
    reasons = np.full(n, None, dtype=object)

    def flag(mask, reason):
        mask = np.asarray(mask, dtype=bool) & (reasons == None)  # noqa: E711 (elementwise)
        reasons[mask] = reason

    out = {}
    for name in ("user_id", "item_id"):
        col = table[cols[name]]
        flag(col.is_null().to_numpy(zero_copy_only=False), f"missing field {name}")
        if pa.types.is_integer(col.type):
            out[name] = pc.cast(col, pa.int64())
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = col
        else:
            raise SourceError(f"{chunk.path}: column {cols[name]!r} ({name}) has type {col.type}; want integer or string")
    ts = table[cols["timestamp"]]
    if pa.types.is_timestamp(ts.type):
        ts = pc.cast(pc.cast(ts, pa.timestamp("s")), pa.int64())
    elif not pa.types.is_integer(ts.type):
        raise SourceError(f"{chunk.path}: column {cols['timestamp']!r} (timestamp) has type {ts.type}; want integer or timestamp")
    else:
        ts = pc.cast(ts, pa.int64())
        if ts_unit == "ms":
            ts = pc.divide(ts, 1000)
    flag(ts.is_null().to_numpy(zero_copy_only=False), "missing field timestamp")
    ts_np = ts.fill_null(0).to_numpy()
    flag((ts_np < cfg_ts[0]) | (ts_np > cfg_ts[1]), f"timestamp out of range [{cfg_ts[0]}, {cfg_ts[1]}]")
    action = np.zeros(n, dtype=np.int32)
    if "action" in cols:
        raw_action = table[cols["action"]]
        flag(raw_action.is_null().to_numpy(zero_copy_only=False), "missing field action")
        known = pa.array(list(actions), type=raw_action.type) if pa.types.is_string(raw_action.type) else None
        if known is None:
            ids = raw_action.fill_null(-1).to_numpy().astype(np.int64)
            flag((ids < 0) | (ids >= len(set(actions.values()))), "unknown action id")
            action = np.clip(ids, 0, None).astype(np.int32)
        else:
            index = pc.index_in(raw_action, value_set=known)
            flag(index.is_null().to_numpy(zero_copy_only=False) & ~raw_action.is_null().to_numpy(zero_copy_only=False), "unknown action")
            index = index.fill_null(0).to_numpy()
            action = np.array([actions[a] for a in known.to_pylist()], dtype=np.int32)[index]
    value = np.full(n, np.nan, dtype=np.float32)
    if "value" in cols:
        value = pc.cast(table[cols["value"]], pa.float32()).fill_null(np.nan).to_numpy()
    if known_items is not None:
        in_catalog = pc.is_in(out["item_id"], value_set=pa.array(sorted(known_items), out["item_id"].type))
        flag(~in_catalog.fill_null(True).to_numpy(zero_copy_only=False), "item_id is not in the item catalog")
    ok = reasons == None  # noqa: E711
    events = pa.table(
        {
            "user_id": out["user_id"].filter(pa.array(ok)),
            "item_id": out["item_id"].filter(pa.array(ok)),
            "timestamp": pa.array(ts_np[ok]),
            "action": pa.array(action[ok]),
            "value": pa.array(value[ok]),
            "source_order": pa.array(source_order(chunk.file_index, rows[ok])),
        }
    )
    bad = ~ok
    rejects = pa.table(
        {
            "source_file": [chunk.path] * int(bad.sum()),
            "row_number": rows[bad],
            "raw": _raw_rows(table, bad),
            "reason": list(reasons[bad]),
        },
        schema=REJECT_SCHEMA,
    )
    return events, rejects, n


def read_chunk(chunk: Chunk, cfg: DataConfig, action_lookup: dict | None, known_items: set | None):
    """Parse one chunk -> (accepted canonical events, rejects, number of input rows)."""
    bounds = (cfg.timestamp_min, cfg.timestamp_max)
    if chunk.kind == "text":
        return _parse_text(chunk, bounds, known_items)
    unit = getattr(cfg.source, "timestamp_unit", "s")
    return _parse_parquet(chunk, bounds, known_items, action_lookup, unit)
