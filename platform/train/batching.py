"""What each training worker feeds the model (and evaluation scores), and the one place seeds are derived.

Determinism is by construction, so a restart from a checkpoint replays exactly
what an uninterrupted run would have done:
- epoch e of a run seeded s draws everything (shuffle, Stochastic Length cuts,
  negatives) from one generator seeded (s, e), plus the worker's rank in the
  streaming mode, where each worker reads its own shard;
- "replicated": every worker draws the same global batches and negatives and
  keeps its rank's slice, so the number of workers does not change the maths.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from ..config import ExperimentConfig
from ..data.batches import build_batch, count_targets, target_windows
from ..data.jagged import select_sequences
from ..data.loader import BatchSpec, iter_torch_batches, to_torch
from ..data.prepared import read_row_batches, split_files
from ..model import sample_negatives
from ..model.losses import log_expected_counts

Batch = dict[str, torch.Tensor]


def batch_spec(cfg: ExperimentConfig, training: bool = False) -> BatchSpec:
    """Batches as the experiment's `batching` section asks (Stochastic Length only when training)."""
    b = cfg.batching
    alpha = b.stochastic_length_alpha if training else None
    return BatchSpec.from_prepared(cfg.data.output_dir, b.layout, cfg.kept_items, alpha)


def evaluation_batches(table: pa.Table, spec: BatchSpec, batch_size: int) -> Iterator[Batch]:
    """Batches that score every target of an evaluation table (rows with eval_start), each from its
    user's most recent spec.keep_items events (genrec.data.batches.target_windows); in order."""
    return iter_torch_batches(target_windows(table, spec.keep_items), spec, batch_size, shuffle=False)


def sampled_users(table: pa.Table, share: float) -> pa.Table:
    """The rows of a fixed share of users, chosen by a hash of the user id (so the same users in every
    window and every run); all rows when share is 1."""
    users = table["user"].to_numpy().astype(np.uint64)
    return _users_below(table, users * np.uint64(0x9E3779B97F4A7C15), share)  # Fibonacci hashing


def evaluated_users(table: pa.Table, share: float) -> pa.Table:
    """The rows of a fixed share of users (eval.users), by a splitmix64 hash of the user id: not the
    Fibonacci hash that sampled_users and the time split's valid/test assignment use, since sampling
    by that same number again would keep only users on one side of the split's threshold (on a time
    split, none of the test users)."""
    x = table["user"].to_numpy().astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return _users_below(table, x ^ (x >> np.uint64(31)), share)


def _users_below(table: pa.Table, hashed: np.ndarray, share: float) -> pa.Table:
    """The rows whose 64-bit user hash, read as a fraction of 2**64 (its top 24 bits), is below `share`."""
    if share >= 1:
        return table
    return table.filter(pa.array((hashed >> np.uint64(40)) < np.uint64(round(share * (1 << 24)))))


def evaluation_split(folder, split: str, keep_items: int, users: float = 1.0, rows: int = 16_384) -> pa.Table:
    """What evaluation ranks of a split (valid, test): the rows of a fixed `users` share of its users
    (evaluated_users), each cut to the windows its targets are scored from (target_windows), read a batch
    of rows at a time: memory follows the evaluated targets' windows, not the split's files."""
    return pa.concat_tables(target_windows(evaluated_users(batch, users), keep_items)
                            for f in split_files(folder, split) for batch in read_row_batches(f, rows=rows))


def split_target_count(folder, split: str) -> int:
    """The number of targets in a split, counted a batch of rows at a time."""
    return sum(count_targets(batch) for f in split_files(folder, split)
               for batch in read_row_batches(f, columns=["items", "eval_start"]))


def epoch_rng(seed: int, epoch: int, rank: int | None = None, repeat: int = 0) -> np.random.Generator:
    """The generator of an epoch's shuffle and negatives (repeat: a window's pass after its first,
    train.window_passes; the first pass draws as a single pass does)."""
    return np.random.default_rng([seed, epoch, *([] if rank is None else [rank]), *([repeat] if repeat else [])])


# train.negatives -> the pools a position's negatives are drawn from, in column order (in_batch: True)
NEGATIVE_POOLS = {"uniform": (False,), "in_batch": (True,), "mixed": (False, True)}


def draw_negatives(rng: np.random.Generator, target_ids: torch.Tensor, spec: BatchSpec, cfg: ExperimentConfig):
    """[P, K] negatives for the P target positions of a batch, from the next seed of `rng`; mixed: [P, 2K],
    the uniform draws, then the in-batch ones."""
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    t = cfg.train
    targets = target_ids[target_ids > 0]
    return torch.cat([sample_negatives(targets, spec.num_items, t.num_negatives, in_batch, generator)
                      for in_batch in NEGATIVE_POOLS[t.negatives]], dim=1)


def negative_log_q(cfg: ExperimentConfig, split: str, num_items: int) -> torch.Tensor:
    """[V+1] log Q of each item as a negative under train.negatives (genrec.model.losses.log_expected_counts),
    the in-batch pool's share from the item counts of `split`'s training targets (every event but a row's
    first), read a batch of rows at a time."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for f in split_files(cfg.data.output_dir, split):
        for batch in read_row_batches(f, columns=["items"]):
            items = batch["items"].combine_chunks()
            offsets = items.offsets.to_numpy()
            firsts = offsets[:-1][np.diff(offsets) > 0]  # a row's first event is nobody's target
            counts += np.bincount(np.delete(items.values.to_numpy(), firsts), minlength=num_items + 1)[: num_items + 1]
    pools = NEGATIVE_POOLS[cfg.train.negatives]
    return log_expected_counts(torch.from_numpy(counts), cfg.train.num_negatives, False in pools, True in pools)


def replicated_batches(table: pa.Table, spec: BatchSpec, cfg: ExperimentConfig, epoch: int, rank: int,
                       world: int, repeat: int = 0) -> Iterator[tuple[Batch, torch.Tensor]]:
    """This rank's share of each global batch of the epoch, with its rows of the global negatives."""
    rng = epoch_rng(cfg.train.seed, epoch, repeat=repeat)
    order = rng.permutation(table.num_rows)
    users = table["user"].to_numpy()
    batch_size = cfg.train.batch_size
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = build_batch(table.take(pa.array(rows)), spec.layout, spec.keep_items, spec.context_columns,
                            spec.context_offsets, spec.stochastic_alpha, rng)
        negatives = draw_negatives(rng, torch.from_numpy(batch["target_ids"]), spec, cfg)
        mine = np.isin(batch["users"], users[np.array_split(rows, world)[rank]])
        has_target = batch["target_ids"] > 0
        my_targets = np.repeat(mine, np.diff(batch["offsets"]))[has_target]
        yield to_torch(select_sequences(batch, mine)), negatives[torch.from_numpy(my_targets)]


def streaming_batches(shard, spec: BatchSpec, cfg: ExperimentConfig, epoch: int, rank: int,
                      world: int, repeat: int = 0) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Batches of this worker's Ray Data shard, with negatives from the worker's own seed."""
    rng = epoch_rng(cfg.train.seed, epoch, rank, repeat)
    batches = iter_torch_batches(shard, spec, max(1, cfg.train.batch_size // world), seed=int(rng.integers(2**31)))
    for batch in batches:
        yield batch, draw_negatives(rng, batch["target_ids"], spec, cfg)
