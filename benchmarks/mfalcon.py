"""Benchmark: M-FALCON ranking against the naive target-aware way, and a cache hit against a miss.

    python benchmarks/mfalcon.py [--lengths 256 1024 4096] [--candidates 64 256 1024]
                                 [--microbatch 128] [--naive-seconds 5] [--reps 5] [--threads T]

Candidates scored per second for one user with n history tokens and m candidates, on an
HSTU stack with the paper's ML-1M shape (D=50, 2 blocks, 1 head, dropout 0, eval mode), float32:
  naive:          each candidate as its own sequence (history + candidate, n + 1 tokens) through
                  HSTU.forward, batched (as many sequences per batch as keep [B, L, L] at ~32M entries);
  M-FALCON miss:  encode_history (the history once, per-layer K/V cached) + candidate_hidden;
  M-FALCON hit:   candidate_hidden on a cached history (what a repeat request of the user costs).
The naive way costs the same per candidate whatever m is, and at n = 4096 it takes seconds per
candidate: it is timed on the first candidates only (at least one batch, at most --naive-seconds
worth, never more than the largest m) and its rate applies to every m; the table says on how many.
The naive outputs of those candidates are checked against M-FALCON's (max abs difference printed).
M-FALCON times are the median of --reps requests after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from genrec.model.encoder_config import EncoderConfig
from genrec.model.hstu import HSTU
from genrec.model.mfalcon import DEFAULT_MICROBATCH, UserCache, candidate_hidden, encode_history

NAIVE_BATCH_ENTRIES = 1 << 25  # sequences per naive batch: B (n + 1)^2 at most this (memory, not speed)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return models[0] if models else platform.processor() or platform.machine()


def history(n: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    timestamps = 1_600_000_000 + torch.randint(1, 86_400, (n,), generator=g).cumsum(0)
    return x, timestamps, int(timestamps[-1]) + 3_600


def naive(blocks: HSTU, x, timestamps, request_time: int, candidates: torch.Tensor, seconds: float):
    """(candidates/s, how many were timed, their outputs): each candidate its own sequence."""
    n = x.size(0)
    per_batch = max(1, NAIVE_BATCH_ENTRIES // (n + 1) ** 2)
    request = timestamps.new_tensor([request_time])
    outputs, done, started = [], 0, time.perf_counter()
    with torch.no_grad():
        while done < candidates.size(0) and (done == 0 or time.perf_counter() - started < seconds):
            batch = candidates[done:done + per_batch]
            b = batch.size(0)
            tokens = torch.cat([x.expand(b, n, -1), batch.unsqueeze(1)], dim=1).reshape(b * (n + 1), -1)
            ts = torch.cat([timestamps, request]).repeat(b)
            target = torch.cat([timestamps[1:], request, request]).repeat(b)
            offsets = torch.arange(b + 1) * (n + 1)
            outputs.append(blocks(tokens, offsets, ts, target)[offsets[1:] - 1])
            done += b
    return done / (time.perf_counter() - started), done, torch.cat(outputs)


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--candidates", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--microbatch", type=int, default=DEFAULT_MICROBATCH)
    parser.add_argument("--naive-seconds", type=float, default=5.0, help="time budget of the naive way per n")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = EncoderConfig(max_seq_len=max(args.lengths) + 1, dim=args.dim, num_blocks=args.blocks,
                           num_heads=args.heads, dropout=0.0)
    blocks = HSTU(config).eval()

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, float32; load average before: {os.getloadavg()[0]:.1f}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model: HSTU D={args.dim}, {args.blocks} blocks, {args.heads} heads, attention "
          f"'{config.attention_impl}' for the naive way; M-FALCON b_m={args.microbatch}")
    print()
    print("| n | m | naive cand/s (timed on) | M-FALCON miss cand/s | miss / naive | M-FALCON hit cand/s "
          "| hit / naive | hit / miss | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    started = time.perf_counter()
    for n in args.lengths:
        x, timestamps, request_time = history(n, args.dim, seed=n)
        all_candidates = torch.randn(max(args.candidates), args.dim, generator=torch.Generator().manual_seed(1))
        naive_rate, timed_on, naive_out = naive(blocks, x, timestamps, request_time, all_candidates,
                                                args.naive_seconds)
        users = UserCache(max_bytes=1 << 30)
        users.put("user", 0, encode_history(blocks, x, timestamps))
        for m in args.candidates:
            candidates = all_candidates[:m]

            def miss():
                return candidate_hidden(blocks, encode_history(blocks, x, timestamps), candidates, request_time,
                                        args.microbatch)

            def hit():
                return candidate_hidden(blocks, users.get("user", 0), candidates, request_time, args.microbatch)

            miss_s, hit_s = median_seconds(miss, args.reps), median_seconds(hit, args.reps)
            checked = min(m, timed_on)
            diff = (hit()[:checked] - naive_out[:checked]).abs().max().item()
            extrapolated = "" if timed_on >= m else ", extrapolated"
            print(f"| {n} | {m} | {naive_rate:,.1f} ({timed_on}{extrapolated}) | {m / miss_s:,.0f} | "
                  f"{m / miss_s / naive_rate:,.0f}x | {m / hit_s:,.0f} | {m / hit_s / naive_rate:,.0f}x | "
                  f"{miss_s / hit_s:.1f}x | {diff:.1e} |", flush=True)
    print()
    print(f"total {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
