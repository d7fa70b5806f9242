"""Benchmark: how large a catalog one machine trains, replicated item tables vs row-wise sharded ones.

    python benchmarks/embedding_scale.py [--items 1000000 10000000] [--dim 64] [--workers 2] [--steps 4]
                                         [--quick]

Each cell is a real training step of genrec's HSTU encoder (2 blocks, N = 50) with the training loop's
loss (sampled softmax, 128 uniform negatives) and AdamW, in `workers` gloo processes on this machine:
- replicated: every worker holds the whole item table, its gradient and AdamW's two moments; the dense
  layers and the table are averaged by DDP (model.embedding_sharding: replicated);
- row_wise: each worker holds a block of the table's rows and their AdamW state
  (model.embedding_sharding: row_wise, genrec.train.sharding); the dense layers stay on DDP;
- row_wise_sparse: row_wise, with the table's rows updated only where a step touched them
  (train.embedding_optimizer: row_sparse_adamw, genrec.train.optim).
Reported per worker: the peak resident memory minus the worker's memory before the model was built
(the model, its gradients, its optimizer state and a step's activations; the worker's largest), and the
median step time. A replicated cell that would need more memory than the machine has (estimated from
its smallest cell, linearly in the items) is not run and says so. The largest catalog per mode: the
per-worker budget (the machine's memory / workers) over the measured bytes per item (the slope between
the two largest cells that ran), i.e. an estimate from measurements, not a run at that size.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import time

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genrec.model import EncoderConfig, build_encoder, sampled_softmax_loss
from genrec.reports import machine
from genrec.train.optim import build_optimizer
from genrec.train.sharding import item_table_names, optimizer_groups, scoring_items, shard_item_tables

GiB = 2**30


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _batch(num_items: int, users: int, length: int, negatives: int, generator: torch.Generator):
    """A jagged batch of `users` sequences of `length` items (long-tail ids), its targets and negatives."""
    ranks = torch.distributions.Pareto(1.0, 1.2).sample((users * length,)).clamp(max=num_items).long()
    ids = ranks.clamp(1, num_items)
    offsets = torch.arange(users + 1) * length
    targets = torch.roll(ids, -1)
    targets[offsets[1:] - 1] = 0  # each user's last position predicts nothing here
    times = torch.arange(users * length) * 60
    sampled = torch.randint(1, num_items + 1, (int((targets > 0).sum()), negatives), generator=generator)
    return ids, times, times + 60, offsets, targets, sampled


def _worker(rank: int, world: int, port: int, mode: str, num_items: int, dim: int, steps: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    before = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(kind="hstu", num_items=num_items, num_positions=50, dim=dim, num_blocks=2,
                                        num_heads=1, dropout=0.0))
    sharded = mode.startswith("row_wise")
    tables = shard_item_tables(model, world, torch.device("cpu")) if sharded else []
    item_tables = [model.get_parameter(f"{name}.weight") for name in item_table_names(model)]
    optimizer = build_optimizer(optimizer_groups(model, tables), item_tables,
                                "row_sparse_adamw" if mode == "row_wise_sparse" else "adamw", lr=1e-3)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    generator = torch.Generator().manual_seed(rank)
    seconds = []
    for _ in range(steps):
        ids, times, target_times, offsets, targets, negatives = _batch(num_items, 64 // world, 50, 128, generator)
        started = time.perf_counter()
        users = wrapped(ids, times, target_times, offsets)
        items, t, n = scoring_items(model, sharded, targets, negatives)
        loss = sampled_softmax_loss(users, t, items, n)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dist.barrier()
        seconds.append(time.perf_counter() - started)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(peaks, torch.tensor([float(_peak_rss() - before)], dtype=torch.float64))
    if rank == 0:
        out.put({"memory": max(float(p) for p in peaks), "step_s": statistics.median(seconds[1:] or seconds)})
    dist.barrier()  # no worker closes its connections while a peer still reads
    dist.destroy_process_group()


def measure(mode: str, workers: int, num_items: int, dim: int, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, workers, port, mode, num_items, dim, steps, out))
                 for rank in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    if any(p.exitcode != 0 for p in processes):
        return {"error": f"exit codes {[p.exitcode for p in processes]} (out of memory?)"}
    return out.get(timeout=10)


MODES = ("replicated", "row_wise", "row_wise_sparse")


def _ratio(top: dict, bottom: dict, key: str) -> str:
    return f"{top[key] / bottom[key]:.2f}x" if key in top and key in bottom else "-"


def would_not_fit(cells: dict, num_items: int, workers: int) -> str | None:
    """Why a replicated cell is not run: its memory, linear in the items from the smallest replicated cell
    that ran, would exceed 90% of what this machine has available (None: run it)."""
    ran = sorted((items, cell["memory"]) for (m, items), cell in cells.items() if m == "replicated" and "memory" in cell)
    if not ran:
        return None
    estimate = ran[0][1] * num_items / ran[0][0] * workers
    available = psutil.virtual_memory().available
    if estimate <= 0.9 * available:
        return None
    return f"not run: ~{estimate / GiB:.0f} GiB for {workers} workers (estimated), {available / GiB:.0f} available"


def largest(cells: dict, mode: str, budget: float) -> str:
    ran = sorted((items, cell["memory"]) for (m, items), cell in cells.items() if m == mode and "memory" in cell)
    if len(ran) < 2:
        return "n/a (fewer than two cells ran)"
    (v1, m1), (v2, m2) = ran[-2], ran[-1]
    per_item = (m2 - m1) / (v2 - v1)
    return f"{(budget - (m2 - per_item * v2)) / per_item / 1e6:,.1f}M items ({per_item:,.0f} B per item)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="100k and 300k items, 2 steps (a check that it runs)")
    args = parser.parse_args()
    if args.quick:
        args.items, args.steps = [100_000, 300_000], 2
    total = psutil.virtual_memory().total
    print(f"machine: {machine()}, {total / GiB:.0f} GiB; {args.workers} gloo workers, D = {args.dim}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    cells = {}
    for num_items in sorted(args.items):
        for mode in MODES:
            skip = would_not_fit(cells, num_items, args.workers) if mode == "replicated" else None
            cell = cells[(mode, num_items)] = {"error": skip} if skip else \
                measure(mode, args.workers, num_items, args.dim, args.steps)
            shown = f"{cell['memory'] / GiB:6.2f} GiB/worker, step {cell['step_s']:.2f} s" if "memory" in cell \
                else cell["error"]
            print(f"{mode:>15} {num_items:>11,} items: {shown}", flush=True)
    print("\n| items | replicated GiB/worker | row-wise GiB/worker | memory ratio | row-wise step / replicated "
          "| row-wise + row_sparse_adamw step / replicated | row_sparse_adamw step / adamw, row-wise |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for num_items in sorted(args.items):
        rep, row, sparse = (cells[(mode, num_items)] for mode in MODES)
        rep_m = f"{rep['memory'] / GiB:.2f}" if "memory" in rep else "not run"
        row_m = f"{row['memory'] / GiB:.2f}" if "memory" in row else "failed"
        print(f"| {num_items:,} | {rep_m} | {row_m} | {_ratio(rep, row, 'memory')} | {_ratio(row, rep, 'step_s')} "
              f"| {_ratio(sparse, rep, 'step_s')} | {_ratio(sparse, row, 'step_s')} |")
    budget = total / args.workers
    print(f"\nlargest catalog at {budget / GiB:.0f} GiB per worker ({args.workers} workers on this machine), "
          f"from the measured bytes per item:")
    for mode in ("replicated", "row_wise"):
        print(f"  {mode}: {largest(cells, mode, budget)}")


if __name__ == "__main__":
    sys.exit(main())
