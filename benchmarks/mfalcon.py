"""Benchmark: M-FALCON with its history cache against the paper's uncached M-FALCON and the naive way.

    python benchmarks/mfalcon.py [--lengths 256 1024 4096] [--candidates 64 256 1024]
                                 [--microbatch 128] [--rounds 5] [--threads T] [--clock wall|cpu]
    python benchmarks/mfalcon.py --quick      # n in {256, 1024}, m in {64, 1024}, 3 rounds

Candidates scored per second for one user with n history tokens and m candidates, on an
HSTU stack with the paper's ML-1M shape (D=50, 2 blocks, 1 head, dropout 0, eval mode), float32:
  naive:          each candidate as its own sequence (history + candidate, n + 1 tokens) through
                  HSTU.forward, batched, on the stack's own attention path (printed: on a CPU the
                  tiled CPU op, the default);
  paper:          the paper's M-FALCON (uncached_candidate_hidden): per microbatch of b_m
                  candidates one target-masked pass over the n + b_m tokens, the history
                  recomputed in every microbatch (no cache across microbatches);
  ours, miss:     encode_history (the history once, per-layer K/V cached) + candidate_hidden;
  ours, hit:      candidate_hidden on a cached history (what a repeat request of the user costs).
The naive way costs the same per candidate whatever m is (independent sequences), and at
n = 4096 it takes about a second per candidate: so it is timed on one batch of about
NAIVE_BATCH_TOKENS tokens per round (1 candidate at n = 4096) and that rate is extrapolated to
every m; the table says on how many candidates it was timed. The paper's and our outputs are
checked against the naive ones (max abs difference printed). Each round times, one after the
other, a naive batch and, for every m, the paper's way, a miss and a hit, so all see the same
load on a shared machine; times are the medians of the rounds, after one warm-up. --clock cpu
times the process's CPU seconds instead of wall seconds: with --threads 1 that is the
single-core compute time, which other jobs on a shared machine disturb far less than wall time
(a multi-threaded run would count spin-waits). The script runs with OMP_WAIT_POLICY=PASSIVE
unless the variable is set (benchmarks/shared_machine.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from genrec.model.encoder_config import EncoderConfig
from genrec.model.hstu import HSTU
from genrec.model.mfalcon import DEFAULT_MICROBATCH, candidate_hidden, encode_history, uncached_candidate_hidden
from genrec.reports import machine
from genrec.serve.cache import UserCache
from shared_machine import passive_omp_wait

NAIVE_BATCH_TOKENS = 8192  # tokens per naive batch (at least one sequence): a fraction of a second to seconds
QUICK = dict(lengths=[256, 1024], candidates=[64, 1024], rounds=3)
WAYS = ("paper", "miss", "hit")


def history(n: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    timestamps = 1_600_000_000 + torch.randint(1, 86_400, (n,), generator=g).cumsum(0)
    return x, timestamps, int(timestamps[-1]) + 3_600


def naive_inputs(x, timestamps, request_time: int, candidates: torch.Tensor):
    """HSTU.forward's arguments for b sequences, each the history followed by one candidate."""
    n, b = x.size(0), candidates.size(0)
    request = timestamps.new_tensor([request_time])
    tokens = torch.cat([x.expand(b, n, -1), candidates.unsqueeze(1)], dim=1).reshape(b * (n + 1), -1)
    ts = torch.cat([timestamps, request]).repeat(b)
    target = torch.cat([timestamps[1:], request, request]).repeat(b)
    offsets = torch.arange(b + 1, device=x.device) * (n + 1)
    return tokens, offsets, ts, target


def naive(blocks: HSTU, x, timestamps, request_time: int, candidates: torch.Tensor) -> torch.Tensor:
    """[b, D]: each candidate its own sequence after the history, in one jagged batch."""
    tokens, offsets, ts, target = naive_inputs(x, timestamps, request_time, candidates)
    return blocks(tokens, offsets, ts, target)[offsets[1:] - 1]


def naive_attention_path(blocks: HSTU, dim: int) -> str:
    """Which attention implementation HSTU.forward runs for the naive batches, e.g. 'auto -> TiledCPUAttention'."""
    x, timestamps, request_time = history(2, dim, seed=0)
    _, offsets, ts, target = naive_inputs(x, timestamps, request_time, x[:1])
    return f"'{blocks.attention_impl}' -> {type(blocks.batch_attention(offsets, ts, target)).__name__}"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, clock):
    started = clock()
    result = fn()
    return clock() - started, result


def measure_length(blocks: HSTU, n: int, args, clock) -> list[str]:
    """The table's rows for one history length n: every m, each way timed side by side."""
    x, timestamps, request_time = history(n, args.dim, seed=n)
    per_batch = max(1, NAIVE_BATCH_TOKENS // (n + 1))
    candidates = torch.randn(max(args.candidates), args.dim, generator=torch.Generator().manual_seed(1))
    users = UserCache(max_bytes=1 << 30)
    users.put("user", 0, encode_history(blocks, x, timestamps))
    ways = {
        "paper": lambda m: uncached_candidate_hidden(blocks, x, timestamps, candidates[:m], request_time,
                                                     args.microbatch),
        "miss": lambda m: candidate_hidden(blocks, encode_history(blocks, x, timestamps), candidates[:m],
                                           request_time, args.microbatch),
        "hit": lambda m: candidate_hidden(blocks, users.get("user", 0), candidates[:m], request_time,
                                          args.microbatch),
    }
    naive_seconds, naive_done, naive_outputs = 0.0, 0, []
    seconds = {(way, m): [] for way in WAYS for m in args.candidates}
    with torch.no_grad():
        for m in args.candidates:  # warm-up
            for way in WAYS:
                ways[way](m)
        naive(blocks, x, timestamps, request_time, candidates[:1])
        for _ in range(args.rounds):
            batch = candidates[naive_done:naive_done + per_batch]
            if batch.size(0):  # small n and m: every candidate may have been timed already
                spent, out = timed(lambda: naive(blocks, x, timestamps, request_time, batch), clock)
                naive_seconds, naive_done = naive_seconds + spent, naive_done + batch.size(0)
                naive_outputs.append(out)
            for m in args.candidates:
                for way in WAYS:
                    seconds[way, m].append(timed(lambda: ways[way](m), clock)[0])
        naive_rate, naive_out = naive_done / naive_seconds, torch.cat(naive_outputs)
        rows = []
        for m in args.candidates:
            rate = {way: m / statistics.median(seconds[way, m]) for way in WAYS}
            checked = min(m, naive_done)
            diff = {way: (ways[way](m)[:checked] - naive_out[:checked]).abs().max().item() for way in ("paper", "hit")}
            extrapolated = "" if naive_done >= m else ", extrapolated"
            rows.append(
                f"| {n} | {m} | {naive_rate:,.1f} ({naive_done}{extrapolated}) | {rate['paper']:,.0f} | "
                f"{rate['miss']:,.0f} | {rate['hit']:,.0f} | {rate['paper'] / naive_rate:,.0f}x | "
                f"{rate['miss'] / naive_rate:,.0f}x | {rate['hit'] / naive_rate:,.0f}x | "
                f"{rate['miss'] / rate['paper']:,.1f}x | {rate['hit'] / rate['paper']:,.1f}x | "
                f"{diff['paper']:.1e} / {diff['hit']:.1e} |")
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--candidates", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--microbatch", type=int, default=DEFAULT_MICROBATCH)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help=f"a few minutes on 2 cores: {QUICK}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (CPU time of several threads counts their spin-waits)")
    omp_wait = passive_omp_wait()
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = EncoderConfig(num_positions=max(args.lengths) + 1, dim=args.dim, num_blocks=args.blocks,
                           num_heads=args.heads, dropout=0.0)
    blocks = HSTU(config).eval()

    print(f"machine: {machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, "
          f"OMP_WAIT_POLICY {omp_wait}; load average before: {os.getloadavg()[0]:.1f}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model: HSTU D={args.dim}, {args.blocks} blocks, {args.heads} heads; naive: HSTU.forward, attention "
          f"{naive_attention_path(blocks, args.dim)}; paper M-FALCON and ours: b_m={args.microbatch}; "
          f"{args.rounds} rounds; {args.clock} clock")
    print()
    print("| n | m | naive cand/s (timed on) | paper M-FALCON cand/s | ours miss cand/s | ours hit cand/s "
          "| paper / naive | miss / naive | hit / naive | miss / paper | hit / paper | max abs diff vs naive "
          "(paper / ours) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    started = time.perf_counter()
    for n in args.lengths:
        for row in measure_length(blocks, n, args, clock):
            print(row, flush=True)
    print()
    print(f"total {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
