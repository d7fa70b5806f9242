"""One vectorised rule set for every source: raw columns -> canonical events + reasons.

Text (CSV, TSV, MovieLens `::`) is first cut into lines and parsed into columns by
pyarrow's CSV reader (`read_text`); Parquet columns arrive typed. Both then go
through `validate`, so the same bad row gets the same reason whatever the format.
All rules are Arrow compute kernels over whole columns; Python only touches rows
that are already rejected (to print them) and lines that are not valid UTF-8.

Rules, in order; a row's reason is the first rule it breaks:

    row:        bad encoding, bad quoting, wrong number of fields, field too long (text only)
    user_id, item_id, timestamp:  missing field X; X is not an integer / out of range;
                timestamp is not an ISO-8601 time; timestamp out of range [lo, hi]
    value:      missing field value; value is not a number
    action:     missing field action; unknown action (or rating out of range)
    catalog:    item_id X is not in the item catalog
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

MAX_FIELD_BYTES = 1 << 16  # longer fields are rejected, not parsed (ids, times and actions are short)
MAX_RAW_CHARS = 2000  # a rejected row is kept in full up to this, then cut with its length noted
INT64_MAX = "9223372036854775807"
NUMBER = r"^-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
ISO_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z",
               "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d")
FIELDS = ("user_id", "item_id", "timestamp", "value", "action")


@dataclass(frozen=True)
class Rules:
    """What the rules check; the same object for every chunk of a source."""

    id_kind: str = "int"  # "int" or "string"
    timestamp_unit: str = "s"  # "s", "ms" or "iso" (text: ISO-8601)
    timestamp_min: int = 0
    timestamp_max: int = 2**62
    actions: tuple = ()  # raw action value -> id pairs; empty: no action column
    num_action_ids: int = 0
    integer_actions_are_ids: bool = True  # an integer action column holds ids, else values looked up in `actions`
    rating: str | None = None  # "stars" (1..5) or "half_stars" (0.5..5): the action is the rating


# ----------------------------------------------------------------------------- text

@dataclass
class TextTable:
    """A parsed text chunk: mapped columns of the rows that parsed, and the rows that did not."""

    columns: dict  # canonical field -> pa.StringArray, one entry per parsed row
    rows: np.ndarray  # 1-based row (line) number of each parsed row
    raw: "callable"  # row numbers -> raw text of those lines
    rejected_rows: np.ndarray
    rejected_reasons: list
    input_rows: int


def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    if len(buf) and buf[-1] != 10:
        ends = np.append(ends, len(buf))
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return starts, ends


def _clip_raw(text: str) -> str:
    return text if len(text) <= MAX_RAW_CHARS else f"{text[:MAX_RAW_CHARS]}... ({len(text)} characters)"


def _unify_line_ends(data: bytes, newline: bytes) -> bytes:
    # old Mac files end lines with CR alone; Windows ones with CRLF
    if b"\r" in data:
        return data.replace(b"\r", b"\n") if newline == b"\r" else data.replace(b"\r\n", b"\n")
    return data


def _unreadable_lines(data: bytes, starts: np.ndarray, ends: np.ndarray, num_fields: int, quoting: bool) -> dict:
    """Line index -> reason, for lines that would make a CSV reader lose its place: empty lines,
    a carriage return left inside a line (the reader would end a row there, and its rows would no
    longer match the lines), invalid UTF-8 and an odd number of quotes (which would run into the
    next lines)."""
    pre = {}
    for i in np.flatnonzero(ends - starts == 0):
        pre[int(i)] = f"wrong number of fields: 0, expected {num_fields}"
    if b"\r" in data:
        buf = np.frombuffer(data, dtype=np.uint8)
        returns = np.concatenate([[0], np.cumsum(buf == ord("\r"))])
        for i in np.flatnonzero(returns[ends] > returns[starts]):
            pre.setdefault(int(i), "bad line end: a carriage return inside the line")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        for i in range(len(starts)):
            try:
                data[starts[i]:ends[i]].decode("utf-8")
            except UnicodeDecodeError as err:
                pre.setdefault(i, f"bad encoding: not UTF-8 at byte {err.start}")
    if quoting and b'"' in data:
        buf = np.frombuffer(data, dtype=np.uint8)
        quotes = np.concatenate([[0], np.cumsum(buf == ord('"'))])
        odd = np.flatnonzero((quotes[ends] - quotes[starts]) % 2 == 1)
        for i in odd:
            pre.setdefault(int(i), "bad quoting: unbalanced quote")
    return pre


def _parse_csv(body: bytes, names: list[str], wanted: list[int], delimiter: str, quoting: bool):
    """pyarrow's CSV reader over the kept lines -> (binary columns `wanted`, [(index among the lines
    it saw, reason)] of the rows with the wrong number of fields, which it skipped)."""
    if delimiter == "::":  # MovieLens .dat; the reader wants one byte (the unit separator never occurs there)
        body, delimiter = body.replace(b"::", b"\x1f"), "\x1f"
    wrong: list[tuple[int, str]] = []

    def handler(row) -> str:
        # row.number counts the rows the reader saw, 1-based (no header: we pass names)
        wrong.append((row.number - 1, f"wrong number of fields: {row.actual_columns}, expected {row.expected_columns}"))
        return "skip"

    if not body:
        return pa.table({names[i]: pa.array([], pa.binary()) for i in wanted}), wrong
    table = pacsv.read_csv(
        pa.BufferReader(body),
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=len(body) + 1),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False,
                                          invalid_row_handler=handler, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            include_columns=[names[i] for i in wanted],
            column_types={names[i]: pa.binary() for i in wanted},
            strings_can_be_null=False, quoted_strings_can_be_null=False),
    )
    return table, wrong


def _drop_long_fields(table: pa.Table, rows_of_table: np.ndarray, pre: dict) -> tuple[pa.Table, np.ndarray]:
    """Rows with a field longer than the limit go to `pre` (an id or a time that long is garbage)."""
    too_long = np.zeros(table.num_rows, dtype=bool)
    for name in table.column_names:
        length = pc.binary_length(table[name]).to_numpy()
        long_here = (length > MAX_FIELD_BYTES) & ~too_long
        for r in np.flatnonzero(long_here):
            pre[int(rows_of_table[r])] = f"field too long: {name} has {int(length[r])} bytes (limit {MAX_FIELD_BYTES})"
        too_long |= long_here
    if too_long.any():
        return table.filter(pa.array(~too_long)), rows_of_table[~too_long]
    return table, rows_of_table


def read_text(data: bytes, first_row: int, names: list[str], positions: dict, delimiter: str,
              quoting: bool = True, newline: bytes = b"\n") -> TextTable:
    """Lines of one chunk (no header) -> mapped string columns + rejected lines with reasons.

    `positions` maps canonical fields to column indexes. Line n of the chunk is row
    first_row + n. Lines are checked before parsing for what would make a reader
    lose its place (invalid UTF-8, an odd number of quotes that would run into the
    next lines, an empty line); the rest is parsed by pyarrow's CSV reader, which
    reports rows with the wrong number of fields to a handler that keeps them.
    """
    data = _unify_line_ends(data, newline)
    starts, ends = _line_bounds(data)
    n = len(starts)
    pre = _unreadable_lines(data, starts, ends, len(names), quoting)  # line index -> reason
    kept = np.ones(n, dtype=bool)
    kept[list(pre)] = False
    parse_lines = np.flatnonzero(kept)
    body = data if kept.all() else b"".join(data[starts[i]:ends[i]] + b"\n" for i in parse_lines)
    table, wrong = _parse_csv(body, names, sorted(set(positions.values())), delimiter, quoting)
    good_seen = np.ones(len(parse_lines), dtype=bool)
    for seen, reason in wrong:
        good_seen[seen] = False
        pre[int(parse_lines[seen])] = reason
    table, rows_of_table = _drop_long_fields(table, parse_lines[good_seen], pre)
    columns = {field: pc.cast(table[names[index]], pa.string()) for field, index in positions.items()}
    rejected = sorted(pre)

    def raw(rows) -> list[str]:
        return [_clip_raw(data[starts[i]:ends[i]].decode("utf-8", "backslashreplace"))
                for i in (int(r) - first_row for r in rows)]

    return TextTable(
        columns=columns,
        rows=rows_of_table.astype(np.int64) + first_row,
        raw=raw,
        rejected_rows=np.array(rejected, dtype=np.int64) + first_row,
        rejected_reasons=[pre[i] for i in rejected],
        input_rows=n,
    )


# ----------------------------------------------------------------------------- rules

class _Reasons:
    """The first reason per row, as an Arrow string column (null = no reason yet).

    A reason's text is built only for the rows that get it: most rows get none.
    """

    def __init__(self, n: int):
        self.reason = pa.nulls(n, pa.string())
        self.any = False

    def flag(self, mask, reason: str, shown: pa.Array | None = None, suffix: str = "", quote: bool = True) -> None:
        """Rows where mask is true get `reason` (+ their value in `shown`, + suffix) unless they have one."""
        new = pc.fill_null(mask, False)
        if self.any:
            new = pc.and_(new, pc.is_null(self.reason))
        if not pc.any(new).as_py():
            return
        if shown is None:
            text = pa.array([reason + suffix] * pc.sum(new).as_py(), pa.string())
        else:
            picked = pc.cast(pc.filter(shown, new), pa.string())
            text = pc.binary_join_element_wise(reason + ("'" if quote else ""), picked, ("'" if quote else "") + suffix, "")
        self.reason = pc.replace_with_mask(self.reason, new, text)
        self.any = True


def _blank(text: pa.Array) -> pa.Array:
    return pc.or_kleene(pc.is_null(text), pc.equal(pc.binary_length(text), 0))  # kleene: null or x is true


def _as_string(col: pa.Array) -> pa.Array:
    return pc.ascii_trim_whitespace(pc.cast(col, pa.string()))


def _parse_int(name: str, col: pa.Array, reasons: _Reasons) -> pa.Array:
    """Integer column or text -> int64 (0 where rejected), flagging missing, non-integer and overflow."""
    if pa.types.is_integer(col.type):
        reasons.flag(pc.is_null(col), f"missing field {name}")
        if col.type == pa.uint64():  # the only integer type that can exceed int64
            big = pc.greater(col, pa.scalar(int(INT64_MAX), pa.uint64()))
            reasons.flag(big, f"{name} out of range: ", col, quote=False)
            col = pc.if_else(big, 0, col)
        return pc.cast(col.fill_null(0), pa.int64())
    text = _as_string(col)
    reasons.flag(_blank(text), f"missing field {name}")
    negative = pc.starts_with(text, "-")
    # cutting the sign off copies the column: only when some value has one
    digits = pc.if_else(negative, pc.utf8_slice_codeunits(text, 1), text) if pc.any(negative).as_py() else text
    is_int = pc.fill_null(pc.ascii_is_decimal(digits), False)  # false for "" too
    if pc.all(is_int).as_py():
        try:  # every value an integer: one cast (it fails only on overflow)
            return pc.cast(text, pa.int64())
        except pa.ArrowInvalid:
            pass
    reasons.flag(pc.invert(is_int), f"{name} is not an integer: ", text)
    usable = is_int
    if (pc.max(pc.binary_length(digits)).as_py() or 0) >= 19:  # up to 18 digits always fit in int64
        digits = pc.utf8_ltrim(digits, "0")
        size = pc.binary_length(digits)
        overflow = pc.and_(is_int, pc.or_(pc.greater(size, 19),
                                          pc.and_(pc.equal(size, 19), pc.greater(digits, INT64_MAX))))
        reasons.flag(overflow, f"{name} out of range: ", text)
        usable = pc.and_(is_int, pc.invert(overflow))
    return pc.replace_with_mask(pa.array(np.zeros(len(text), np.int64)), usable, pc.cast(text.filter(usable), pa.int64()))


def _ids(name: str, col: pa.Array, rules: Rules, reasons: _Reasons) -> pa.Array:
    if rules.id_kind == "int":
        return _parse_int(name, col, reasons)
    text = _as_string(col)
    reasons.flag(_blank(text), f"missing field {name}")
    return text.fill_null("")


def _check_range(seconds: pa.Array, shown: pa.Array, rules: Rules, reasons: _Reasons) -> None:
    lo, hi = rules.timestamp_min, rules.timestamp_max
    out = pc.or_(pc.less(seconds, lo), pc.greater(seconds, hi))
    reasons.flag(out, f"timestamp out of range [{lo}, {hi}]: ", shown, quote=False)


def _timestamps(col: pa.Array, rules: Rules, reasons: _Reasons) -> pa.Array:
    """-> int64 Unix seconds; ISO-8601 text, Arrow timestamps, or integers in s or ms."""
    if pa.types.is_timestamp(col.type):
        reasons.flag(pc.is_null(col), "missing field timestamp")
        seconds = pc.cast(pc.cast(col, pa.timestamp("s", col.type.tz)), pa.int64()).fill_null(0)
        _check_range(seconds, seconds, rules, reasons)
        return seconds
    if rules.timestamp_unit == "iso" and not pa.types.is_integer(col.type):
        text = _as_string(col)
        reasons.flag(_blank(text), "missing field timestamp")
        clean = pc.replace_substring_regex(text, r"Z$", "+0000")
        clean = pc.replace_substring_regex(clean, r"([+-][0-9]{2}):([0-9]{2})$", r"\1\2")
        clean = pc.replace_substring_regex(clean, r"\.[0-9]+", "")  # fractions of a second: dropped
        parsed = pc.coalesce(*(  # with %z Arrow gives UTC-aware times; all of them as naive UTC
            pc.cast(pc.strptime(clean, format=f, unit="s", error_is_null=True), pa.timestamp("s")) for f in ISO_FORMATS))
        reasons.flag(pc.is_null(parsed), "timestamp is not an ISO-8601 time: ", text)
        seconds = pc.cast(parsed, pa.int64()).fill_null(0)
        _check_range(seconds, text, rules, reasons)
        return seconds
    raw = _parse_int("timestamp", col, reasons)
    seconds = pa.array(np.floor_divide(raw.to_numpy(), 1000)) if rules.timestamp_unit == "ms" else raw
    _check_range(seconds, raw, rules, reasons)
    return seconds


def _values(col: pa.Array, reasons: _Reasons) -> pa.Array:
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        reasons.flag(pc.is_null(col), "missing field value")
        return pc.cast(col, pa.float32()).fill_null(np.nan)
    text = _as_string(col)
    reasons.flag(_blank(text), "missing field value")
    is_number = pc.fill_null(pc.match_substring_regex(text, NUMBER), False)
    reasons.flag(pc.invert(is_number), "value is not a number: ", text)
    return pc.cast(pc.cast(pc.if_else(is_number, text, "nan"), pa.float64()), pa.float32())


def _actions(col: pa.Array | None, value: pa.Array, value_text: pa.Array | None, rules: Rules,
             reasons: _Reasons) -> pa.Array:
    n = len(value)
    if rules.rating is not None:  # MovieLens: the rating is the action
        steps = pc.multiply(value, 2.0) if rules.rating == "half_stars" else value
        top = 10 if rules.rating == "half_stars" else 5
        whole = pc.equal(pc.floor(steps), steps)
        ok = pc.and_(whole, pc.and_(pc.greater_equal(steps, 1), pc.less_equal(steps, top)))
        shown = value_text if value_text is not None else value
        reasons.flag(pc.invert(ok), "rating out of range: ", shown)
        return pc.cast(pc.subtract(pc.if_else(ok, steps, 1.0), 1.0), pa.int32())
    if col is None:
        return pa.array(np.zeros(n, dtype=np.int32))
    known = dict(rules.actions)
    if pa.types.is_integer(col.type) and rules.integer_actions_are_ids:
        reasons.flag(pc.is_null(col), "missing field action")
        ids = pc.cast(col.fill_null(0), pa.int64())
        bad = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, rules.num_action_ids))
        reasons.flag(bad, "unknown action id ", ids, f"; known: 0..{rules.num_action_ids - 1}", quote=False)
        return pc.cast(pc.if_else(bad, 0, ids), pa.int32())
    text = _as_string(col)
    reasons.flag(_blank(text), "missing field action")
    names = pa.array(list(known), pa.string())
    index = pc.index_in(text, value_set=names)
    known_text = json.dumps(sorted(known)).replace('"', "'")
    reasons.flag(pc.is_null(index), "unknown action ", text, f"; known: {known_text}")
    ids = pa.array(np.array(list(known.values()), dtype=np.int32))
    return pc.take(ids, index.fill_null(0))


def validate(columns: dict, rules: Rules, catalog: pa.Array | None = None) -> tuple[dict, pa.Array]:
    """Raw columns (canonical field -> Arrow array) -> (canonical columns, reason per row or null).

    Every input row gets exactly one outcome: its canonical values, or its first reason.
    """
    n = len(columns["user_id"])
    columns = {k: (v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v) for k, v in columns.items()}
    reasons = _Reasons(n)
    user = _ids("user_id", columns["user_id"], rules, reasons)
    item = _ids("item_id", columns["item_id"], rules, reasons)
    ts = _timestamps(columns["timestamp"], rules, reasons)
    value_col = columns.get("value")
    if value_col is not None:
        value = _values(value_col, reasons)
        value_text = None if (pa.types.is_integer(value_col.type) or pa.types.is_floating(value_col.type)) else _as_string(value_col)
    else:
        value, value_text = pa.array(np.full(n, np.nan, dtype=np.float32)), None
    action = _actions(columns.get("action"), value, value_text, rules, reasons)
    if catalog is not None:
        in_catalog = pc.is_in(item, value_set=pc.cast(catalog, item.type))
        reasons.flag(pc.invert(in_catalog), "item_id ", item, " is not in the item catalog", quote=False)
    return {"user_id": user, "item_id": item, "timestamp": ts, "action": action, "value": value}, reasons.reason
