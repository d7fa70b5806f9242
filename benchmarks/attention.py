"""Benchmark: the fused HSTU attention against its PyTorch reference and softmax attention.

    python benchmarks/attention.py [--device cpu|cuda] [--lengths 200 1024 2048] [--tokens 8192]
                                   [--heads 2] [--dim 32] [--reps 3] [--threads T]

On CPU it runs with OMP_WAIT_POLICY=PASSIVE unless the variable is set (see
benchmarks/shared_machine.py: on a shared machine, spinning OpenMP threads slow the
tiled path's many small ops far more than SDPA's one fused call).

Forward and forward+backward time and peak memory of
  fused:     hstu_attention_cpu on CPU, hstu_attention_triton on CUDA (bias from the tables, in the op)
  reference: hstu_attention_reference (pads, materialises the [B, L, L] bias and [B, H, L, L] scores)
  SDPA:      causal softmax attention through torch's scaled_dot_product_attention on the
             batch padded to its longest user (what the SASRec baseline runs; flash on GPU)
on synthetic jagged batches: per maximum length n, one user of length n and the others
log-uniform on [n/8, n] (as benchmarks/train_throughput.py), without and with Stochastic
Length (the users' most recent items kept). Every implementation sees the same batch,
and the timed calls are interleaved, so the ratios hold even on a shared machine.
Ratios > 1 mean the fused op is faster / smaller. Peak memory: CUDA's allocator peak on
GPU; on CPU the growth of the resident set, sampled every millisecond (approximate), in a
second process run with glibc's mmap threshold at 64 KiB so that freed tensors leave the
resident set; the times come from this process, without the sampler thread (it takes
the GIL every millisecond) and without that malloc setting (it makes every large
allocation a fresh mmap), both of which would slow the ops being timed.
TFLOP/s (GPU): the causal half of the real (unpadded) tokens, 2 matmuls forward, 7 in all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genrec.data.batches import stochastic_length
from genrec.model.ops.hstu_attention_cpu import hstu_attention_cpu
from genrec.model.ops.hstu_attention_reference import hstu_attention_reference
from genrec.reports import cpu_model
from shared_machine import passive_omp_wait

SETTINGS = (("none", None), ("SL α=1.7", 1.7))


def synthetic_lengths(n: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
    low = max(1, n // 8)
    draws = np.exp(rng.uniform(np.log(low), np.log(n), tokens // low + 1)).astype(np.int64)
    lengths = np.concatenate([[n], draws])
    return lengths[: max(1, np.searchsorted(np.cumsum(lengths), tokens, side="right"))]


def make_batch(lengths: np.ndarray, n: int, heads: int, dim: int, dtype, device) -> dict:
    lengths_t = torch.from_numpy(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths_t.cumsum(0)])
    T, B, L = int(offsets[-1]), len(lengths), int(lengths.max())
    clock = 1_600_000_000 + torch.randint(1, 86_400, (T + 1,)).cumsum(0)
    jagged = [torch.randn(T, heads, dim, device=device, dtype=dtype) * 0.5 for _ in range(3)]
    padded = [torch.randn(B, heads, L, dim, device=device, dtype=dtype) for _ in range(3)]
    hstu_args = [*jagged, offsets.to(device), clock[:-1].to(device), clock[1:].to(device),
                 torch.randn(2 * n - 1, device=device) * 0.02, torch.randn(129, device=device) * 0.02, n, float(n)]
    return {"hstu": hstu_args, "sdpa": padded, "tokens": T, "users": B}


def trainable(args: list) -> list:
    return [a.detach().requires_grad_() if i in (0, 1, 2, 6, 7) else a for i, a in enumerate(args)]


class PeakMemory:
    """Peak bytes above the start: CUDA allocator stats, or the sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.start


class NoMemory:
    bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def run_once(fn, args: list, backward: bool, device: torch.device, memory: bool) -> tuple[float, int]:
    args = trainable(args) if backward else args
    with PeakMemory(device) if memory else NoMemory() as memory:
        start = time.perf_counter()
        out = fn(*args)
        if backward:
            out.backward(torch.ones_like(out))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, memory.bytes


def measure(impls: dict, batch: dict, backward: bool, reps: int, device: torch.device, memory: bool) -> dict:
    """Min seconds and max peak bytes per implementation over interleaved repetitions (first is warm-up)."""
    results = {name: ([], []) for name in impls}
    for rep in range(reps + 1):
        for name, (fn, key) in impls.items():
            if results[name] is None:
                continue
            try:
                seconds, peak = run_once(fn, batch[key], backward, device, memory)
            except (RuntimeError, MemoryError):  # out of memory
                results[name] = None
                continue
            if rep:
                results[name][0].append(seconds)
                results[name][1].append(peak)
    return {name: None if r is None else (min(r[0]), max(r[1])) for name, r in results.items()}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()}, {torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"{name}; torch {torch.__version__}, triton {triton_version}"


def cpu_peaks(argv: list[str]) -> list:
    """Peak bytes per row and implementation, measured by a second run of this script (--memory-only)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    child = subprocess.run([sys.executable, __file__, *argv, "--memory-only"], env=env, capture_output=True,
                           text=True, check=True)
    return json.loads(child.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--tokens", type=int, help="tokens per batch before Stochastic Length")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32, help="dqk = dv per head")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the CPU memory run
    args = parser.parse_args()
    if args.device == "cpu":
        passive_omp_wait()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        from genrec.model.ops.hstu_attention_triton import hstu_attention_triton as fused

        dtype, lengths, tokens = torch.bfloat16, args.lengths or [1024, 2048, 4096, 8192], args.tokens or 65536
    else:
        fused, dtype = hstu_attention_cpu, torch.float32
        lengths, tokens = args.lengths or [200, 1024, 2048], args.tokens or 8192
    impls = {
        "fused": (fused, "hstu"),
        "reference": (hstu_attention_reference, "hstu"),
        "SDPA": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "sdpa"),
    }
    # CUDA's allocator statistics are free; on CPU a second process samples the resident set
    peaks = [] if args.memory_only else cpu_peaks(sys.argv[1:]) if device.type == "cpu" else None
    reps, out = (1, open(os.devnull, "w")) if args.memory_only else (args.reps, sys.stdout)
    print(f"# HSTU attention, {machine(device)}; {str(dtype).removeprefix('torch.')}, "
          f"{args.heads} heads x {args.dim}, about {tokens} tokens per batch; OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.1f}", file=out)
    header = ("n", "setting", "users", "kept %", "pass", "fused ms", "ref ms", "SDPA ms", "ref/fused", "SDPA/fused",
              "fused MB", "ref MB", "SDPA MB") + (("fused TFLOP/s",) if device.type == "cuda" else ())
    print("| " + " | ".join(header) + " |", file=out)
    print("|" + "---|" * len(header), file=out)
    row_number = 0
    rng = np.random.default_rng(0)
    for n in lengths:
        full = synthetic_lengths(n, tokens, rng)
        for setting, alpha in SETTINGS:
            kept = full if alpha is None else stochastic_length(full, n, alpha, rng)
            batch = make_batch(kept, n, args.heads, args.dim, dtype, device)
            for backward, name in ((False, "fwd"), (True, "fwd+bwd")):
                r = measure(impls, batch, backward, reps, device, memory=args.memory_only or device.type == "cuda")
                if args.memory_only:
                    peaks.append({k: None if v is None else v[1] for k, v in r.items()})
                    continue
                if device.type == "cpu":
                    r = {k: None if v is None else (v[0], peaks[row_number][k] or 0) for k, v in r.items()}
                    row_number += 1
                ms = {k: "OOM" if v is None else f"{v[0] * 1e3:.1f}" for k, v in r.items()}
                mb = {k: "OOM" if v is None else f"{v[1] / 2**20:.0f}" for k, v in r.items()}

                def ratio(other):
                    return "-" if r[other] is None or r["fused"] is None else f"{r[other][0] / r['fused'][0]:.2f}x"

                row = [n, setting, batch["users"], f"{100 * kept.sum() / full.sum():.0f}", name, ms["fused"],
                       ms["reference"], ms["SDPA"], ratio("reference"), ratio("SDPA"), mb["fused"], mb["reference"],
                       mb["SDPA"]]
                if device.type == "cuda" and r["fused"] is not None:
                    causal_pairs = float((kept * (kept + 1) / 2).sum())
                    flops = 2 * 2 * args.heads * args.dim * causal_pairs * (3.5 if backward else 1)
                    row.append(f"{flops / r['fused'][0] / 1e12:.1f}")
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
    if args.memory_only:
        print(json.dumps(peaks))
    else:
        print(f"load average at end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
