"""Prepared splits -> jagged torch batches (values + offsets), locally or through Ray Data.

    spec = BatchSpec.from_prepared("outputs/data/ml-1m", layout="items", keep_items=200)
    for batch in iter_torch_batches(read_split(folder, "train"), spec, batch_size=128, seed=0):
        ...                                 # batch["item_ids"], batch["offsets"], ...

In Ray Train the same builder runs over a dataset shard's streaming iterator:
    iter_torch_batches(ray.train.get_dataset_shard("train"), spec, batch_size=128, seed=epoch)
Truncation to the most recent keep_items items (and Stochastic Length) happens here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from .batches import build_batch, context_offsets
from .prepared import read_manifest


@dataclass(frozen=True)
class BatchSpec:
    """How to build batches from a prepared dataset (see genrec.data.batches.build_batch)."""

    layout: str = "items"
    keep_items: int = 200  # the most recent items a batch keeps per user (config: cfg.kept_items)
    context_columns: tuple[str, ...] = ()
    context_offsets: tuple[int, ...] = ()
    stochastic_alpha: float | None = None
    num_items: int = 0

    @classmethod
    def from_prepared(cls, folder, layout="items", keep_items=200, stochastic_alpha=None) -> "BatchSpec":
        manifest = read_manifest(folder)
        columns = tuple(manifest["context_features"]) if layout == "interleaved" else ()
        shifts = context_offsets(manifest, list(columns))
        return cls(layout, keep_items, columns, shifts, stochastic_alpha, manifest["num_items"])


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def _table_batches(table: pa.Table, batch_size: int, rng: np.random.Generator | None) -> Iterator[pa.Table]:
    order = rng.permutation(table.num_rows) if rng is not None else np.arange(table.num_rows)
    for start in range(0, table.num_rows, batch_size):
        yield table.take(pa.array(order[start : start + batch_size]))


def iter_torch_batches(source, spec: BatchSpec, batch_size: int, seed: int | None = None,
                       shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Jagged torch batches from a pa.Table (local) or a Ray Data dataset / shard iterator.

    `seed` fixes the shuffle and Stochastic Length draws (pass e.g. base_seed * 1000 + epoch).
    """
    rng = np.random.default_rng(seed)
    if isinstance(source, pa.Table):
        tables = _table_batches(source, batch_size, rng if shuffle else None)
    else:  # ray.data.Dataset or DataIterator (ray.train.get_dataset_shard)
        tables = source.iter_batches(
            batch_size=batch_size, batch_format="pyarrow",
            local_shuffle_buffer_size=batch_size * 8 if shuffle else None,
            local_shuffle_seed=seed if shuffle else None,
        )
    for table in tables:
        batch = build_batch(table, spec.layout, spec.keep_items, spec.context_columns, spec.context_offsets,
                            spec.stochastic_alpha, rng)
        if len(batch["users"]):
            yield to_torch(batch)
