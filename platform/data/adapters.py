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
import fnmatch
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..config import (
    TEXT_SUFFIXES,
    ActionsConfig,
    ColumnMapping,
    CsvSource,
    DataConfig,
    MovieLensCsvSource,
    MovieLensSource,
    ParquetSource,
    SyntheticSource,
    UsersFile,
    resolve_path,
)
from ..errors import GenrecError
from .schema import EVENT_SCHEMA, REJECT_SCHEMA, source_order
from .validation import FIELDS, Rules, read_text, validate


class SourceError(GenrecError, ValueError):
    """A source that cannot be read at all (missing file, empty file, wrong format)."""


MOVIELENS_ACTIONS = ["rating_1", "rating_2", "rating_3", "rating_4", "rating_5"]
INTEGER = re.compile(r"-?\d+\Z")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")


@dataclass(frozen=True)
class TextFormat:
    """How to cut one text file into lines and fields."""

    names: tuple  # column names in file order (the header, given names, or "0", "1", ...)
    positions: dict  # canonical field (and kept feature) -> column index
    delimiter: str = ","  # "::" for MovieLens .dat
    quoting: bool = True
    newline: bytes = b"\n"  # b"\r" for old Mac files
    compression: str | None = None  # "gzip" or "zstd": the whole file is one chunk
    header: bool = False  # the chunk starts with the header line (compressed files only)


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
    checksums: dict  # file -> sha256 of the file
    rules: Rules = field(default_factory=Rules)
    catalog: pa.Table | None = None  # item_id + item features (movies.dat / movies.csv / items.parquet)
    users: pa.Table | None = None  # user_id + context features
    context_columns: list[str] = field(default_factory=list)
    item_features: list[str] = field(default_factory=list)  # event columns kept as item features


# ----------------------------------------------------------------------------- helpers

COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(f"{what} not found: {path}")
    if not path.is_file():
        raise SourceError(f"{what} is not a file: {path}")
    if path.stat().st_size == 0:
        raise SourceError(f"{what} is empty: {path}")
    return path


def _files_in(path: Path, pattern: str | None, suffixes: tuple, what: str) -> list[Path]:
    """A file named explicitly, whatever its name; in a folder (and its subfolders), the files whose
    name matches `pattern` (a glob), by default those ending in one of `suffixes`."""
    if not path.is_dir():
        return [_require_file(path, what)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (fnmatch.fnmatch(p.name, pattern) if pattern else p.name.endswith(suffixes)))
    if not files:
        wanted = repr(pattern) if pattern else "/".join("*" + s for s in suffixes)
        raise SourceError(f"{what}: no {wanted} files in folder {path}; set data.source.file_pattern "
                          f"(e.g. '*.data') or name the file in data.source.path")
    return [_require_file(p, what) for p in files]


def file_checksum(path: Path) -> str:
    """sha256 of the whole file, streamed (the manifest's source checksum)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _compression(path: Path) -> str | None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return COMPRESSION.get(path.suffix)


def _open_text(path: str, compression: str | None):
    """A binary stream of the file's text, decompressed on the fly."""
    raw = pa.OSFile(str(path))
    return pa.CompressedInputStream(raw, compression) if compression else raw


def _first_line(path: Path, compression: str | None) -> tuple[bytes, bytes]:
    """(first line without its end, the line end: LF or CR)."""
    stream = _open_text(path, compression)
    try:
        head = stream.read(1 << 20)
    except (OSError, pa.ArrowInvalid) as err:
        raise SourceError(f"{path}: cannot read as {compression or 'text'} ({err})") from None
    finally:
        stream.close()
    lf, cr = head.find(b"\n"), head.find(b"\r")
    newline = b"\r" if cr >= 0 and (lf < 0 or (cr < lf - 1)) else b"\n"  # CR alone, not CRLF: an old Mac file
    end = head.find(newline)
    line = head if end < 0 else head[:end]
    return line.rstrip(b"\r"), newline


def _text_chunks(file_index: int, path: Path, fmt: TextFormat, chunk_bytes: int, skip_header: bool) -> list[Chunk]:
    """Split a text file at line ends into ~chunk_bytes pieces, counting lines to number rows.

    A compressed file cannot be cut without reading it, so it is one chunk.
    """
    if fmt.compression:
        return [Chunk(file_index, str(path), "text", 0, -1, 2 if skip_header else 1,
                      text_format=replace(fmt, header=skip_header))]
    chunks = []
    size = path.stat().st_size
    nl = fmt.newline
    with open(path, "rb") as f:
        start, line = 0, 1
        if skip_header:
            head = f.read(1 << 20)
            start, line = (head.index(nl) + 1 if nl in head else size), 2
        while start < size:
            stop = min(start + chunk_bytes, size)
            f.seek(stop)
            while stop < size:  # finish the line we landed in
                block = f.read(1 << 16)
                if not block:
                    stop = size
                elif nl in block:
                    stop += block.index(nl) + 1
                    break
                else:
                    stop += len(block)
            f.seek(start)
            lines_in_chunk = f.read(stop - start).count(nl)
            chunks.append(Chunk(file_index, str(path), "text", start, stop, line, text_format=fmt))
            start, line = stop, line + lines_in_chunk
    return chunks


def _csv_header(path: Path, delimiter: str, compression: str | None) -> tuple[list[str], bytes]:
    first, newline = _first_line(path, compression)
    try:
        text = first.decode("utf-8-sig")
        header = pacsv.read_csv(pa.BufferReader(text.encode() + b"\n"),
                                parse_options=pacsv.ParseOptions(delimiter=delimiter)).column_names
    except (UnicodeDecodeError, pa.ArrowInvalid):
        header = []
    if not header:
        raise SourceError(f"{path}: the first line is not a readable CSV header; for a headerless file set "
                          f"data.source.header: false")
    return header, newline


def _positions(header: list[str], wanted: dict, path: Path, read_header: bool = False) -> dict:
    """Column index of each wanted column; read_header: `header` is the file's first line."""
    missing = {k: v for k, v in wanted.items() if v not in header}
    if missing:
        names = ", ".join(f"{v!r} (for {k})" for k, v in missing.items())
        hint = "set data.source.columns"
        if read_header and all(NUMBER.match(h.strip()) for h in header):
            hint = ("the first line looks like data, not a header (all numbers): for a headerless file set "
                    "data.source.header: false (and name the columns with column_names, or by position \"0\", \"1\", ...)")
        raise SourceError(f"{path}: column {names} not in header {header}; {hint}")
    return {k: header.index(v) for k, v in wanted.items()}


def _wanted(columns: ColumnMapping, features: list[str]) -> dict:
    """canonical field (or feature column) -> source column name"""
    wanted = {"user_id": columns.user_id, "item_id": columns.item_id, "timestamp": columns.timestamp}
    if columns.action:
        wanted["action"] = columns.action
    if columns.value:
        wanted["value"] = columns.value
    for name in features:
        if name in wanted.values():
            raise SourceError(f"data.source.item_features: {name!r} is already mapped in data.source.columns")
        wanted[f"feature:{name}"] = name
    return wanted


def action_ids(actions: ActionsConfig) -> dict:
    """Raw action value -> id: the names, the values a prefix stands for, then the mapping."""
    ids = {name: i for i, name in enumerate(actions.names)}
    if actions.prefix:
        ids.update({name.removeprefix(actions.prefix): i for i, name in enumerate(actions.names)
                    if name.startswith(actions.prefix) and name != actions.prefix})
    ids.update({raw: ids[name] for raw, name in actions.mapping.items()})
    return ids


def _rules(cfg: DataConfig, **kw) -> Rules:
    return Rules(timestamp_min=cfg.timestamp_min, timestamp_max=cfg.timestamp_max, **kw)


def _action_rules(source) -> dict:
    if not source.columns.action:
        return {}
    ids = action_ids(source.actions)
    # with a prefix an integer column holds values (4 -> rating_4), not ids
    return {"actions": tuple(ids.items()), "num_action_ids": len(source.actions.names),
            "integer_actions_are_ids": source.actions.prefix is None}


# ----------------------------------------------------------------------------- planning

def _plan_movielens(source: MovieLensSource, cfg: DataConfig) -> SourcePlan:
    root = resolve_path(source.path)
    if not root.is_dir():
        raise SourceError(f"MovieLens folder not found: {root}")
    ratings = _require_file(root / source.ratings_file, "MovieLens ratings file")
    with open(ratings, "rb") as f:
        if b"::" not in f.readline():
            raise SourceError(f"{ratings}: not a MovieLens '::' file (first line has no '::')")
    fmt = TextFormat(("user_id", "item_id", "value", "timestamp"), {"user_id": 0, "item_id": 1, "value": 2, "timestamp": 3},
                     delimiter="::", quoting=False)
    catalog = read_movies_dat(_require_file(root / source.movies_file, "MovieLens movies file"))
    users = read_users_dat(_require_file(root / source.users_file, "MovieLens users file")) if source.users_file else None
    return SourcePlan(
        chunks=_text_chunks(0, ratings, fmt, cfg.chunk_bytes, skip_header=False),
        actions=MOVIELENS_ACTIONS,
        merge_actions=False,
        checksums={str(ratings): file_checksum(ratings)},
        rules=_rules(cfg, rating="stars"),
        catalog=catalog,
        users=users,
        context_columns=[c for c in (users.column_names[1:] if users is not None else [])],
    )


def _plan_movielens_csv(source: MovieLensCsvSource, cfg: DataConfig) -> SourcePlan:
    root = resolve_path(source.path)
    ratings = _require_file(root / source.ratings_file, "MovieLens ratings.csv")
    compression = _compression(ratings)
    header, newline = _csv_header(ratings, ",", compression)
    positions = _positions(header, {"user_id": "userId", "item_id": "movieId", "timestamp": "timestamp", "value": "rating"}, ratings)
    fmt = TextFormat(tuple(header), positions, newline=newline, compression=compression)
    catalog = read_movies_csv(_require_file(root / source.movies_file, "MovieLens movies.csv")) if source.movies_file else None
    return SourcePlan(
        chunks=_text_chunks(0, ratings, fmt, cfg.chunk_bytes, skip_header=True),
        actions=[f"rating_{h}" for h in ("0.5", "1", "1.5", "2", "2.5", "3", "3.5", "4", "4.5", "5")],
        merge_actions=False,
        checksums={str(ratings): file_checksum(ratings)},
        rules=_rules(cfg, rating="half_stars"),
        catalog=catalog,
    )


def _plan_csv(source: CsvSource, cfg: DataConfig) -> SourcePlan:
    files = _files_in(resolve_path(source.path), source.file_pattern,
                      tuple(t + c for t in TEXT_SUFFIXES for c in ("", *COMPRESSION)), "CSV event log")
    wanted = _wanted(source.columns, source.item_features)
    chunks = []
    for index, path in enumerate(files):
        compression = _compression(path)
        if source.header:
            names, newline = _csv_header(path, source.delimiter, compression)
        else:
            first, newline = _first_line(path, compression)
            count = len(first.split(source.delimiter.encode()))
            names = source.column_names or [str(i) for i in range(count)]
        fmt = TextFormat(tuple(names), _positions(names, wanted, path, read_header=source.header), source.delimiter,
                         newline=newline, compression=compression)
        chunks += _text_chunks(index, path, fmt, cfg.chunk_bytes, skip_header=source.header)
    users = read_users_text(source.users_file, source.delimiter, source.columns.id_type) if source.users_file else None
    return SourcePlan(
        chunks=chunks,
        actions=source.actions.names,
        merge_actions=source.actions.merge_same_impression,
        checksums={str(p): file_checksum(p) for p in files},
        rules=_rules(cfg, id_kind=source.columns.id_type, timestamp_unit=source.timestamp_unit, **_action_rules(source)),
        users=users,
        context_columns=users.column_names[1:] if users is not None else [],
        item_features=list(source.item_features),
    )


def _plan_parquet(source: ParquetSource, cfg: DataConfig) -> SourcePlan:
    files = _files_in(resolve_path(source.path), source.file_pattern, (".parquet",), "Parquet event log")
    wanted = _wanted(source.columns, source.item_features)
    chunks = []
    for index, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowInvalid, OSError) as err:
            raise SourceError(f"{path}: not a readable Parquet file ({err})") from None
        names = meta.schema.names
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
        rules=_rules(cfg, id_kind=source.columns.id_type, timestamp_unit=source.timestamp_unit, **_action_rules(source)),
        users=users,
        context_columns=users.column_names[1:] if users is not None else [],
        item_features=list(source.item_features),
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


def read_users_text(spec: UsersFile, delimiter: str, id_type: str) -> pa.Table:
    """A delimited users file -> user_id (typed as the event log's ids) + context features (text)."""
    path = _require_file(resolve_path(spec.path), "users file")
    delimiter = spec.delimiter or delimiter
    if spec.header:
        names, _ = _csv_header(path, delimiter, _compression(path))
    else:
        first, _ = _first_line(path, _compression(path))
        names = spec.column_names or [str(i) for i in range(len(first.split(delimiter.encode())))]
    try:  # every column as text: ids are typed below, features are categories ("01234" stays a zip code)
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(spec.header)),
                               parse_options=pacsv.ParseOptions(delimiter=delimiter),
                               convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                    strings_can_be_null=False))
    except pa.ArrowInvalid as err:
        raise SourceError(f"{path}: not a readable users file ({err})") from None
    names = table.column_names
    features = spec.features if spec.features is not None else [n for n in names if n != spec.user_id]
    missing = [n for n in [spec.user_id, *features] if n not in names]
    if missing:
        raise SourceError(f"{path}: column {missing} not in {names}; set data.source.users_file.user_id / features")
    ids = pc.ascii_trim_whitespace(table[spec.user_id])
    if id_type == "int":
        bad = [i for i, v in enumerate(ids.to_pylist()) if not INTEGER.match(v)]
        if bad:
            raise SourceError(f"{path}: line {bad[0] + 1 + spec.header}: user_id {ids[bad[0]].as_py()!r} is not an "
                              "integer (data.source.columns.id_type is int)")
        ids = pc.cast(ids, pa.int64())
    repeated = [c["values"] for c in pc.value_counts(ids).to_pylist() if c["counts"] > 1]
    if repeated:
        raise SourceError(f"{path}: user_id {repeated[0]!r} has more than one row (one row per user)")
    return pa.table({"user_id": ids, **{n: table[n] for n in features}})


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

def _read_text_chunk(chunk: Chunk) -> tuple[dict, np.ndarray, object, np.ndarray, list, int]:
    fmt = chunk.text_format
    if fmt.compression:
        stream = _open_text(chunk.path, fmt.compression)
        try:
            data = stream.read()
        except (OSError, pa.ArrowInvalid) as err:
            raise SourceError(f"{chunk.path}: cannot decompress ({fmt.compression}): {err}") from None
        finally:
            stream.close()
        if fmt.header:
            end = data.find(fmt.newline)
            data = data[end + 1:] if end >= 0 else b""
    else:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start)
            data = f.read(chunk.stop - chunk.start)
    text = read_text(data, chunk.first_row, list(fmt.names), fmt.positions, fmt.delimiter, fmt.quoting, fmt.newline)
    return text.columns, text.rows, text.raw, text.rejected_rows, text.rejected_reasons, text.input_rows


def _read_parquet_chunk(chunk: Chunk):
    cols = chunk.parquet_columns
    table = pq.ParquetFile(chunk.path).read_row_group(chunk.start, columns=sorted(set(cols.values())))
    n = table.num_rows
    rows = np.arange(chunk.first_row, chunk.first_row + n, dtype=np.int64)

    def raw(row_numbers):
        picked = table.take(pa.array(np.asarray(row_numbers, dtype=np.int64) - chunk.first_row))
        return [json.dumps(r, default=str) for r in picked.to_pylist()]

    columns = {k: table[v] for k, v in cols.items()}
    return columns, rows, raw, np.zeros(0, np.int64), [], n


def read_chunk(chunk: Chunk, rules: Rules, catalog: pa.Array | None = None):
    """Parse and validate one chunk -> (accepted canonical events, rejects, item features, input rows).

    Item features: the kept feature columns of accepted rows, first row per item (None if none kept).
    """
    reader = _read_text_chunk if chunk.kind == "text" else _read_parquet_chunk
    columns, rows, raw, pre_rows, pre_reasons, input_rows = reader(chunk)
    canonical, reason = validate({k: v for k, v in columns.items() if k in FIELDS}, rules, catalog)
    ok = pc.is_null(reason)
    ok_np = ok.to_numpy(zero_copy_only=False)
    id_type = pa.string() if rules.id_kind == "string" else pa.int64()
    schema = EVENT_SCHEMA.set(0, pa.field("user_id", id_type)).set(1, pa.field("item_id", id_type))
    order = pa.array(source_order(chunk.file_index, rows[ok_np]))
    events = pa.table({**{k: pc.filter(v, ok) for k, v in canonical.items()}, "source_order": order}).select(schema.names)
    events = events.cast(schema)
    bad_rows = rows[~ok_np]
    rejects = pa.table(
        {
            "source_file": [chunk.path] * (len(pre_rows) + len(bad_rows)),
            "row_number": np.concatenate([pre_rows, bad_rows]),
            "raw": raw(pre_rows) + raw(bad_rows),
            "reason": pre_reasons + pc.filter(reason, pc.invert(ok)).to_pylist(),
        },
        schema=REJECT_SCHEMA,
    ).sort_by("row_number")
    features = None
    kept = [k for k in columns if k.startswith("feature:")]
    if kept:
        features = pa.table({"item_id": events["item_id"], "source_order": order,
                             **{k.split(":", 1)[1]: pc.filter(columns[k], ok) for k in kept}})
        first = np.unique(features["item_id"].to_numpy(zero_copy_only=False), return_index=True)[1]
        features = features.take(pa.array(np.sort(first)))
    return events, rejects, features, input_rows
