"""Benchmark: one ML-1M epoch (training + one full evaluation), fused CPU attention vs the plain reference.

    python jobs/prepare.py --config configs/ml-1m/data.yaml      # once
    python benchmarks/epoch.py [--configs configs/ml-1m/paper-hstu.yaml configs/ml-1m/paper-hstu-large.yaml]
                               [--impls cpu pytorch] [--rounds 2] [--threads 2] [--steps S]
                               [--impls cpu cpu+compile pytorch]   # also torch.compile per layer

For each recipe and `model.attention_impl`, the steps of the training loop
(genrec.train.loop) without Ray around them: one epoch over the training split
(the epoch-0 batches and negatives of `replicated_batches`, sampled softmax,
AdamW), then one full ranking of the validation split (`evaluate`, batches of
`eval.batch_size` users). Both implementations start from the same weights and
see the same batches, so their losses must agree (printed, as a check that the
fast path computes the same model); the rounds alternate the implementations
and the table keeps each one's fastest round, so load from other processes hits
both alike. The machine's load average is printed with the table; the script
runs with OMP_WAIT_POLICY=PASSIVE unless the variable is set (see
benchmarks/shared_machine.py). An impl
written `cpu+compile` also wraps each layer's pointwise parts (Eq. (1) and
Eq. (3): layer norms, SiLU, gate, dropout, projections) in torch.compile with
dynamic shapes; its train time includes the compilation.

The paper's public code on this machine type (2-core AMD EPYC, fp32; measured for
issue 12, not run by this script): HSTU-large 95.8 s training per epoch (autograd
anomaly detection off) + 18.6 s per evaluation = 114.4 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from genrec.artifact import build_model
from genrec.config import load_config
from genrec.data.loader import iter_torch_batches
from genrec.data.prepared import read_split
from genrec.model import sampled_softmax_loss
from genrec.reports import machine
from genrec.train.batching import batch_spec, replicated_batches
from genrec.train.evaluation import evaluate
from shared_machine import passive_omp_wait

PAPER_CODE_SECONDS = {"ml-1m-paper-hstu-large": (95.8, 18.6)}  # train, evaluation: the measurement


def run_epoch(cfg, impl: str, steps: int | None, device: str = "cpu") -> dict:
    """One training epoch and one validation ranking of a fresh model (seeded) -> seconds, loss, tokens.
    device: where the model and batches go (benchmarks/gpu_check.py runs it on "cuda")."""
    attention_impl, *options = impl.split("+")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attention_impl": attention_impl})})
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device)
    if "compile" in options:
        for layer in model.blocks.layers:
            layer.project = torch.compile(layer.project, dynamic=True)
            layer.output = torch.compile(layer.output, dynamic=True)
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    table = read_split(cfg.data.output_dir, "train")
    batches = list(replicated_batches(table, batch_spec(cfg, training=True), cfg, 0, 0, 1))[:steps]
    model.train()
    started = time.perf_counter()
    loss_sum = 0.0
    for batch, negatives in batches:
        batch, negatives = {k: v.to(device) for k, v in batch.items()}, negatives.to(device)
        users = model(batch["item_ids"], batch["timestamps"], batch["target_timestamps"], batch["offsets"])
        loss = sampled_softmax_loss(users, batch["target_ids"], model.all_item_embeddings(), negatives,
                                    temperature=t.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())  # also waits for a GPU's queued kernels
    train_seconds = time.perf_counter() - started
    valid = read_split(cfg.data.output_dir, "valid")
    started = time.perf_counter()
    valid_batches = iter_torch_batches(valid, batch_spec(cfg), cfg.eval.batch_size, shuffle=False)
    metrics = evaluate(model, ({k: v.to(device) for k, v in b.items()} for b in valid_batches), ties=cfg.eval.ties)
    return {"train": train_seconds, "eval": time.perf_counter() - started, "loss": loss_sum / len(batches),
            "ndcg": metrics["ndcg@10"], "tokens": sum(len(b["item_ids"]) for b, _ in batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["configs/ml-1m/paper-hstu.yaml", "configs/ml-1m/paper-hstu-large.yaml"],
                        help="the paper's recipes (the comparison with its code); the loop here draws uniform negatives")
    parser.add_argument("--impls", nargs="+", default=["cpu", "pytorch"],
                        help="model.attention_impl values; the first is the fast path, the last the baseline")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each implementation's fastest")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the recipes' cpus_per_worker)")
    parser.add_argument("--steps", type=int, help="only the first S training steps (a smoke test)")
    args = parser.parse_args()
    omp_wait = passive_omp_wait()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"OMP_WAIT_POLICY {omp_wait}; load average at start {os.getloadavg()[0]:.1f}")
    print(f"command: python {' '.join(sys.argv)}")
    rows = []
    for path in args.configs:
        cfg = load_config(path)
        if not Path(cfg.data.output_dir, "manifest.json").exists():
            sys.exit(f"no prepared data in {cfg.data.output_dir}: run python jobs/prepare.py --config {path} first")
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for impl in args.impls if round_ % 2 == 0 else args.impls[::-1]:
                r = run_epoch(cfg, impl, args.steps)
                r["total"] = r["train"] + r["eval"]
                print(f"  {cfg.name} {impl} round {round_ + 1}: train {r['train']:.1f} s, eval {r['eval']:.1f} s, "
                      f"loss {r['loss']:.6f}, valid ndcg@10 {r['ndcg']:.4f}; load {os.getloadavg()[0]:.1f}",
                      flush=True)
                if impl not in best or r["total"] < best[impl]["total"]:
                    best[impl] = r
        rows.append((cfg.name, best))
    base = args.impls[-1]
    print(f"\nload average at end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(f"| recipe | attention_impl | train s | eval s | train + eval s | train tok/s | vs {base} | "
          "vs the paper's code (114.4 s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, best in rows:
        for impl, r in best.items():
            paper = PAPER_CODE_SECONDS.get(name)
            vs_paper = f"{sum(paper) / r['total']:.2f}x" if paper and args.steps is None else "-"
            print(f"| {name} | {impl} | {r['train']:.1f} | {r['eval']:.1f} | {r['total']:.1f} | "
                  f"{r['tokens'] / r['train']:,.0f} | {best[base]['total'] / r['total']:.2f}x | {vs_paper} |")


if __name__ == "__main__":
    main()
