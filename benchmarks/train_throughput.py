"""Benchmark: training throughput of the HSTU encoder (fused and plain attention) vs the SASRec Transformer.

    python benchmarks/train_throughput.py [--lengths 200 1024 4096 8192] [--steps 5] [--tokens 16384]
                                          [--device cpu|cuda] [--quick]

Tokens/s of a full training step (forward, sampled-softmax loss, backward, AdamW
step) of HSTU with its default attention (`model.attention_impl: auto`: the tiled
CPU path on CPU, Triton on CUDA), of HSTU with the plain PyTorch reference
attention (`pytorch`: materialised [B, L, L] bias and [B, H, L, L] scores), and of
SASRec (softmax attention through PyTorch's scaled_dot_product_attention), same
width and depth, measured side by side on the
same synthetic jagged batches at several maximum lengths N, without and with
Stochastic Length (alpha 1.6 and 1.8). The paper reports HSTU 5.3x to 15.2x faster
than a FlashAttention2 Transformer at N = 8192 on GPU; this shows where genrec's
HSTU stands, on CPU or (when there is one) GPU. The machine's load average is
printed with the table (in each cell the three models run one after the other on the
same batch); on CPU the script runs with OMP_WAIT_POLICY=PASSIVE unless the variable
is set (see benchmarks/shared_machine.py).

Throughput counts the batch's tokens before Stochastic Length, i.e. how fast
training consumes the data; "kept tokens %" is the share Stochastic Length fed to
the model. A cell whose step does not fit in memory shows OOM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from genrec.data.batches import stochastic_length
from genrec.data.jagged import concat_ranges, offsets_from_lengths
from genrec.model import EncoderConfig, build_encoder, sampled_softmax_loss
from genrec.reports import cpu_model
from shared_machine import passive_omp_wait

NUM_ITEMS = 10_000
DIM, NUM_BLOCKS, NUM_HEADS = 64, 2, 2  # dqk = dv = DIM / NUM_HEADS = 32; SASRec FFN width DIM
SETTINGS = (("none", None), ("SL α=1.6", 1.6), ("SL α=1.8", 1.8))
WARMUP_STEPS = 1
MEMORY_FRACTION = 0.8  # of the memory available at start that the CPU run may take


def synthetic_users(n: int, tokens: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Users of at most n items, at most `tokens` items in all but never fewer than one user.

    The first user has exactly n items, so every batch reaches the length N it is
    labelled with; the others are log-uniform on [n/8, n], heavy-tailed so that
    Stochastic Length has long users to cut.
    """
    low = max(1, n // 8)
    draws = np.exp(rng.uniform(np.log(low), np.log(n), tokens // low + 1)).astype(np.int64)
    lengths = np.concatenate([[n], draws])
    lengths = lengths[: max(1, np.searchsorted(np.cumsum(lengths), tokens, side="right"))]
    total = int(lengths.sum())
    # One global clock: times increase within every user, and the next token's time
    # (at a user's last position, the next user's first) is the target timestamp.
    clock = 1_600_000_000 + np.cumsum(rng.integers(1, 86_400, total + 1))
    return {
        "lengths": lengths,
        "item_ids": rng.integers(1, NUM_ITEMS + 1, total),
        "target_ids": rng.integers(1, NUM_ITEMS + 1, total),
        "timestamps": clock[:-1],
        "target_timestamps": clock[1:],
    }


def most_recent(users: dict[str, np.ndarray], kept: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """The jagged model inputs when each user keeps only its `kept` most recent items."""
    keep = concat_ranges(np.cumsum(users["lengths"]) - kept, kept)
    inputs = {k: torch.from_numpy(users[k][keep]).to(device)
              for k in ("item_ids", "target_ids", "timestamps", "target_timestamps")}
    inputs["offsets"] = torch.from_numpy(offsets_from_lengths(kept)).to(device)
    return inputs


MODELS = {"HSTU": ("hstu", "auto"), "HSTU reference": ("hstu", "pytorch"), "SASRec": ("sasrec", "auto")}


def step_seconds(model: str, n: int, inputs: dict[str, torch.Tensor], steps: int, device: torch.device,
                 config: EncoderConfig | None = None, autocast: torch.dtype | None = None,
                 losses: list | None = None) -> list[float]:
    """Seconds of each timed training step of a fresh encoder (a key of MODELS) on one batch.

    config replaces the model's shape (benchmarks/gpu_check.py times other recipes); autocast runs
    forward and loss under torch.autocast in that dtype; losses, when given, receives every step's loss."""
    torch.manual_seed(0)
    kind, impl = MODELS[model]
    config = config or EncoderConfig(kind, NUM_ITEMS, n, DIM, NUM_BLOCKS, NUM_HEADS, ffn_dim=DIM, dropout=0.0,
                                     attention_impl=impl)
    encoder = build_encoder(config).to(device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-3)
    negatives = torch.Generator(device).manual_seed(0)
    seconds = []
    for _ in range(WARMUP_STEPS + steps):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            user_vectors = encoder(inputs["item_ids"], inputs["timestamps"], inputs["target_timestamps"],
                                   inputs["offsets"])
            loss = sampled_softmax_loss(user_vectors, inputs["target_ids"], encoder.all_item_embeddings(),
                                        generator=negatives)
        if losses is not None:
            losses.append(loss.detach())  # a tensor: reading it here would wait for the GPU mid-step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: wait for the step to finish
        seconds.append(time.perf_counter() - started)
    return seconds[WARMUP_STEPS:]


def tokens_per_second(model: str, n: int, inputs: dict[str, torch.Tensor], tokens: int, steps: int,
                      device: torch.device) -> float | None:
    """`tokens` over the median step time; None when the step runs out of memory."""
    try:
        return tokens / statistics.median(step_seconds(model, n, inputs, steps, device))
    except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError too
        if "out of memory" in str(error) or "can't allocate memory" in str(error):
            return None
        raise


def cap_memory() -> int:
    """Cap this process's address space so that a step the machine cannot hold fails
    with a catchable error (reported as OOM) instead of waking the kernel's OOM
    killer, which may pick another process. Returns the headroom in bytes."""
    import resource

    import psutil

    headroom = int(MEMORY_FRACTION * psutil.virtual_memory().available)
    limit = psutil.Process().memory_info().vms + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return headroom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", help="maximum sequence lengths N (default 200 1024 4096 8192)")
    parser.add_argument("--steps", type=int,
                        help="timed steps per cell up to N = 1024, proportionally fewer above, at least 2 (default 5)")
    parser.add_argument("--tokens", type=int, help="tokens per step before Stochastic Length (default 16384)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke test: N = 64, 128, tiny batches, 2 timed steps")
    args = parser.parse_args()
    lengths = args.lengths or ([64, 128] if args.quick else [200, 1024, 4096, 8192])
    steps = args.steps or (2 if args.quick else 5)
    tokens = args.tokens or (512 if args.quick else 16_384)
    device = torch.device(args.device)

    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (float32)"
    else:
        omp_wait = passive_omp_wait()
        torch.set_num_threads(os.cpu_count())
        where = (f"cpu, {torch.get_num_threads()} threads (float32), OMP_WAIT_POLICY {omp_wait}, "
                 f"memory cap {cap_memory() / (1 << 30):.1f} GiB")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, device {where}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"models: D={DIM}, {NUM_BLOCKS} blocks, {NUM_HEADS} heads, dqk=dv={DIM // NUM_HEADS}, SASRec FFN {DIM}, "
          f"dropout 0; V={NUM_ITEMS:,}, sampled softmax with 128 negatives, AdamW")

    batches = {n: synthetic_users(n, max(tokens, n), np.random.default_rng(n)) for n in lengths}
    timed = {n: max(2, steps * min(n, 1024) // n) for n in lengths}
    print(f"batches: one user of length N plus users log-uniform on [N/8, N], up to {tokens:,} tokens; "
          f"{WARMUP_STEPS} warm-up step, then the median of the timed steps; tok/s counts tokens before SL")
    for n, users in batches.items():
        print(f"  N={n}: {len(users['lengths'])} users, {users['lengths'].sum():,} tokens, {timed[n]} timed steps")
    print()
    print("| N | setting | kept tokens % | HSTU tok/s | HSTU reference tok/s | SASRec tok/s | HSTU / reference "
          "| HSTU / SASRec | reference / SASRec |")
    print("|---:|:---|---:|---:|---:|---:|---:|---:|---:|")
    started = time.perf_counter()
    for n, users in batches.items():
        total = int(users["lengths"].sum())
        for name, alpha in SETTINGS:
            kept = users["lengths"]
            if alpha is not None:
                kept = stochastic_length(kept, n, alpha, np.random.default_rng(1))
            inputs = most_recent(users, kept, device)
            rates = [tokens_per_second(model, n, inputs, total, timed[n], device) for model in MODELS]
            cells = [f"{rate:,.0f}" if rate else "OOM" for rate in rates]
            ratios = [f"{a / b:.2f}x" if a and b else "-" for a, b in
                      ((rates[0], rates[1]), (rates[0], rates[2]), (rates[1], rates[2]))]
            print(f"| {n} | {name} | {100 * kept.sum() / total:.1f} | {' | '.join(cells)} | {' | '.join(ratios)} |",
                  flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at end (1, 5, 15 min): "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
