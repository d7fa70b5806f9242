"""Arrow schemas of the data contracts (docs/ARCHITECTURE.md, "Data contracts")."""

import pyarrow as pa

SCHEMA_VERSION = 1

# Canonical event, one row per user action. `source_order` (file index << 40 | row number)
# is the deterministic tie-break for equal timestamps: source order, as read.
EVENT_FIELDS = [
    pa.field("user_id", pa.int64()),
    pa.field("item_id", pa.int64()),
    pa.field("timestamp", pa.int64()),
    pa.field("action", pa.int32()),
    pa.field("value", pa.float32()),
    pa.field("source_order", pa.int64()),
]
EVENT_SCHEMA = pa.schema(EVENT_FIELDS)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("source_file", pa.string()),
        pa.field("row_number", pa.int64()),  # 1-based line (text) or row (Parquet) number
        pa.field("raw", pa.string()),  # the row as read; undecodable bytes shown as \\x escapes
        pa.field("reason", pa.string()),
    ]
)

ROW_BITS = 40  # rows per file < 2**40; files per source < 2**23


def source_order(file_index: int, row_numbers):
    return (file_index << ROW_BITS) + row_numbers


def sequence_schema(context_columns: list[str]) -> pa.Schema:
    """One row per user, sorted by (timestamp, source order)."""
    return pa.schema(
        [
            pa.field("user", pa.int32()),
            pa.field("items", pa.list_(pa.int32())),
            pa.field("actions", pa.list_(pa.int32())),
            pa.field("timestamps", pa.list_(pa.int64())),
            pa.field("values", pa.list_(pa.float32())),
        ]
        + [pa.field(c, pa.int32()) for c in context_columns]
    )
