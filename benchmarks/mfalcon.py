"""Benchmark: M-FALCON ranking against the naive target-aware way, and a cache hit against a miss.

    python benchmarks/mfalcon.py [--lengths 256 1024 4096] [--candidates 64 256 1024]
                                 [--microbatch 128] [--rounds 5] [--threads T] [--clock wall|cpu]

Candidates scored per second for one user with n history tokens and m candidates, on an
HSTU stack with the paper's ML-1M shape (D=50, 2 blocks, 1 head, dropout 0, eval mode), float32:
  naive:          each candidate as its own sequence (history + candidate, n + 1 tokens) through
                  HSTU.forward, batched;
  M-FALCON miss:  encode_history (the history once, per-layer K/V cached) + candidate_hidden;
  M-FALCON hit:   candidate_hidden on a cached history (what a repeat request of the user costs).
The naive way costs the same per candidate whatever m is (independent sequences), and at
n = 4096 it takes seconds per candidate: so it is timed on one batch of about NAIVE_BATCH_TOKENS
tokens per round (1 candidate at n = 4096) and that rate is extrapolated to every m; the table
says on how many candidates it was timed. Their outputs are checked against M-FALCON's (max abs
difference printed). Each round times, one after the other, a naive batch and a miss and a hit
for every m, so all three see the same load on a shared machine; M-FALCON times are the median
of the rounds, after one warm-up. --clock cpu times the process's CPU seconds instead of wall
seconds: with --threads 1 that is the single-core compute time, which other jobs on a shared
machine disturb far less than wall time (a multi-threaded run would count spin-waits).
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
from genrec.model.mfalcon import DEFAULT_MICROBATCH, candidate_hidden, encode_history
from genrec.reports import cpu_model
from genrec.serve.cache import UserCache

NAIVE_BATCH_TOKENS = 8192  # tokens per naive batch (at least one sequence): a fraction of a second to seconds


def history(n: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    timestamps = 1_600_000_000 + torch.randint(1, 86_400, (n,), generator=g).cumsum(0)
    return x, timestamps, int(timestamps[-1]) + 3_600


def naive(blocks: HSTU, x, timestamps, request_time: int, candidates: torch.Tensor) -> torch.Tensor:
    """[b, D]: each candidate its own sequence after the history, in one jagged batch."""
    n, b = x.size(0), candidates.size(0)
    request = timestamps.new_tensor([request_time])
    tokens = torch.cat([x.expand(b, n, -1), candidates.unsqueeze(1)], dim=1).reshape(b * (n + 1), -1)
    ts = torch.cat([timestamps, request]).repeat(b)
    target = torch.cat([timestamps[1:], request, request]).repeat(b)
    offsets = torch.arange(b + 1, device=x.device) * (n + 1)
    return blocks(tokens, offsets, ts, target)[offsets[1:] - 1]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, clock):
    started = clock()
    result = fn()
    return clock() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--candidates", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--microbatch", type=int, default=DEFAULT_MICROBATCH)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (CPU time of several threads counts their spin-waits)")
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = EncoderConfig(num_positions=max(args.lengths) + 1, dim=args.dim, num_blocks=args.blocks,
                           num_heads=args.heads, dropout=0.0)
    blocks = HSTU(config).eval()

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, float32; load average before: {os.getloadavg()[0]:.1f}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model: HSTU D={args.dim}, {args.blocks} blocks, {args.heads} heads; naive: HSTU.forward, attention "
          f"'{config.attention_impl}'; M-FALCON b_m={args.microbatch}; {args.rounds} rounds; {args.clock} clock")
    print()
    print("| n | m | naive cand/s (timed on) | M-FALCON miss cand/s | miss / naive | M-FALCON hit cand/s "
          "| hit / naive | hit vs miss | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    started = time.perf_counter()
    for n in args.lengths:
        x, timestamps, request_time = history(n, args.dim, seed=n)
        per_batch = max(1, NAIVE_BATCH_TOKENS // (n + 1))
        candidates = torch.randn(max(args.candidates), args.dim, generator=torch.Generator().manual_seed(1))
        users = UserCache(max_bytes=1 << 30)
        users.put("user", 0, encode_history(blocks, x, timestamps))

        def miss(m):
            return candidate_hidden(blocks, encode_history(blocks, x, timestamps), candidates[:m], request_time,
                                    args.microbatch)

        def hit(m):
            return candidate_hidden(blocks, users.get("user", 0), candidates[:m], request_time, args.microbatch)

        naive_seconds, naive_done, naive_outputs = 0.0, 0, []
        seconds = {(way, m): [] for way in ("miss", "hit") for m in args.candidates}
        with torch.no_grad():
            for m in args.candidates:  # warm-up
                miss(m), hit(m)
            naive(blocks, x, timestamps, request_time, candidates[:1])
            for _ in range(args.rounds):
                batch = candidates[naive_done:naive_done + per_batch]
                spent, out = timed(lambda: naive(blocks, x, timestamps, request_time, batch), clock)
                naive_seconds, naive_done = naive_seconds + spent, naive_done + batch.size(0)
                naive_outputs.append(out)
                for m in args.candidates:
                    seconds["miss", m].append(timed(lambda: miss(m), clock)[0])
                    seconds["hit", m].append(timed(lambda: hit(m), clock)[0])
            naive_rate, naive_out = naive_done / naive_seconds, torch.cat(naive_outputs)
            for m in args.candidates:
                miss_s, hit_s = statistics.median(seconds["miss", m]), statistics.median(seconds["hit", m])
                checked = min(m, naive_done)
                diff = (hit(m)[:checked] - naive_out[:checked]).abs().max().item()
                extrapolated = "" if naive_done >= m else ", extrapolated"
                print(f"| {n} | {m} | {naive_rate:,.1f} ({naive_done}{extrapolated}) | {m / miss_s:,.0f} | "
                      f"{m / miss_s / naive_rate:,.0f}x | {m / hit_s:,.0f} | {m / hit_s / naive_rate:,.0f}x | "
                      f"{miss_s / hit_s:.1f}x | {diff:.1e} |", flush=True)
    print()
    print(f"total {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
