"""Benchmark: a behaviour log of 100M events end to end on one machine: prepared side by side with polars'
streaming engine, then trained through Ray Data, with memory that should not grow with the log.

    python benchmarks/large_log.py --full     # 10M and 100M events, and the synthetic preset: about two hours; not in `make bench`
    python benchmarks/large_log.py            # 1M and 10M events: the same steps in minutes (in `make bench`)

For each size:
1. the behaviour log of benchmarks/data_pipeline.py (generated once, in chunks, kept under --data), as CSV;
2. prepare: polars' streaming engine (`polars_prepare(streaming=True)`, one process) and genrec's Ray
   pipeline (`prepare()`), each in its own subprocess: wall and CPU seconds, the peak PSS of the whole
   process tree, and the counts, which must be equal;
3. train: HSTU (D = 64, 2 blocks, N = 50) on genrec's prepared output with `jobs/train.py`, the streaming
   data mode (Ray Data shards: no worker reads the whole split) on 2 workers of half a CPU each (the rest
   reads the data), one epoch of --steps steps
   (train.steps_per_epoch), then the evaluation of a fixed eval.users share of the held-out users: the
   peak PSS of the whole process tree and of the largest Ray Train worker, events/s, the progress line;
4. serve: the registered model behind the Serve app of configs/serve/demo.yaml (2 replicas of each
   deployment, the histories of every user in the embedded store), loaded and answering /v1/rank and
   /v1/recommend (benchmarks/serve_load.py's throughput table): the peak PSS of the whole process tree and
   of the largest Serve replica.
5. synthetic (with --full or named in --stages): the synthetic `large` preset (configs/synthetic/large.yaml,
   ~100M events) generated and prepared by jobs/prepare.py from nothing: wall, CPU, peak PSS, its summary.
Memory that does not grow with the log is the target: the 10x larger log should train in the same memory,
apart from the item table, which grows with the log's catalog (reported beside it).

    python benchmarks/large_log.py --full --stages serve      # one stage again, on what an earlier run left
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

from genrec.data.prepared import read_manifest
from genrec.train.sharding import item_table_bytes

from data_pipeline import REPO, T_MAX, T_MIN, generate, genrec_data_config, machine, measured, sampled_run

STAGES = ("prepare", "train", "serve", "synthetic")
EPOCH_LINE = re.compile(r"\[train\] epoch 1/1 .* ([\d,]+) tok/s epoch ([\d.]+)s \(\+eval ([\d.]+)s\)")


def tag(events: int, items: int | None) -> str:
    """How a log's files and runs are named: its size, and its catalog when --items fixes it."""
    return f"{events}" if items is None else f"{events}-items-{items}"


def prepare_both(events: int, items: int | None, data: Path, sides: list[str]) -> dict:
    """Step 2 for one size: {side: result}; genrec's output is kept for training (data/prepared-<tag>)."""
    path = data / f"behaviour-{tag(events, items)}" / "behaviour.csv"
    if not path.exists():
        generate(events, path.parent, items)
    results = {}
    for side in sides:
        out = data / f"{'prepared' if side == 'genrec-ray' else 'polars'}-{tag(events, items)}"
        shutil.rmtree(out, ignore_errors=True)
        results[side] = measured(side, path, out)
        print(f"{events:,} events, prepare, {side}: {json.dumps(results[side])}", flush=True)
    shutil.rmtree(data / f"polars-{tag(events, items)}", ignore_errors=True)
    return results


def train_config(name: str, data: Path, steps: int, users: float) -> Path:
    """The run's config (a file, as a user would write it)."""
    prepared = data / f"prepared-{name}"
    config = {
        "name": f"large-log-{name}",
        "data": genrec_data_config("csv", data / f"behaviour-{name}", prepared),
        # the log's catalog grows with it (events / 25 items): at 100M events a replicated 4M-item table with
        # AdamW took ~10 GiB per worker and Ray's memory monitor killed the run; auto shards it row-wise
        "model": {"kind": "hstu", "dim": 64, "num_blocks": 2, "num_heads": 1, "max_seq_len": 50,
                  "embedding_sharding": "auto"},
        "train": {"epochs": 1, "steps_per_epoch": steps, "batch_size": 128, "num_negatives": 128,
                  "embedding_optimizer": "row_sparse_adamw",
                  "num_workers": 2, "cpus_per_worker": 0.5, "data_mode": "streaming",
                  "storage_path": str(data / "runs"), "run_name": f"large-log-{name}"},
        "eval": {"users": users, "batch_size": 256},
        "tracking": {"tracking_uri": f"sqlite:///{data / 'mlflow.db'}", "experiment": "large-log"},
    }
    assert config["data"]["timestamp_min"] == T_MIN and config["data"]["timestamp_max"] == T_MAX
    path = data / f"large-log-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    shutil.rmtree(data / "runs" / f"large-log-{name}", ignore_errors=True)  # a fresh run, not a resume
    return path


def train(name: str, data: Path, steps: int, users: float) -> dict:
    """Step 3 for one size."""
    run = sampled_run([sys.executable, str(REPO / "jobs" / "train.py"), "--config",
                       str(train_config(name, data, steps, users))], worker_name="RayTrainWorker")
    lines = run["output"].splitlines()
    if run["returncode"] != 0:
        print("\n".join(lines[-40:]))
        raise SystemExit(f"training on the log {name} failed")
    epoch = next(EPOCH_LINE.search(line) for line in lines if EPOCH_LINE.search(line))
    progress = [line for line in lines if re.match(r"\[train\] epoch 1: step", line)]
    items = read_manifest(data / f"prepared-{name}")["num_items"]
    row_wise = any("item table row-wise" in line for line in lines)
    table_gib = item_table_bytes(items, 64) / (2 if row_wise else 1) / (1 << 30)
    return {"items": items, "table": "row-wise" if row_wise else "replicated", "table_gib": table_gib,
            "events_per_s": float(epoch.group(1).replace(",", "")), "train_s": float(epoch.group(2)),
            "eval_s": float(epoch.group(3)), "progress": progress[-1] if progress else "(epoch under a minute)",
            "evaluation": next((line for line in lines if "evaluation:" in line), ""),
            **{k: run[k] for k in ("wall_s", "peak_gib", "worker_peak_gib", "load")}}


def serve(name: str, data: Path, requests: int) -> dict:
    """Step 4 for one size: serve_load.py's throughput table on the run's registered model."""
    run = sampled_run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--skip", "kills,autoscaling",
                       "--set", f"model.uri=models:/large-log-{name}/latest",
                       "--set", f"model.tracking_uri=sqlite:///{data / 'mlflow.db'}",
                       "--requests", str(requests), "--concurrency", "16", "--candidates", "200"],
                      worker_name="ServeReplica")
    lines = run["output"].splitlines()
    if run["returncode"] != 0:
        print("\n".join(lines[-40:]))
        raise SystemExit(f"serving the model of the log {name} failed")
    rows = [line for line in lines if line.startswith("| `/v1/")]
    return {"model": next(line for line in lines if line.startswith("model ")), "rows": rows,
            **{k: run[k] for k in ("wall_s", "peak_gib", "worker_peak_gib", "load")}}


def synthetic(data: Path) -> dict:
    """Step 5: the `large` preset generated (Ray tasks) and prepared, from an empty folder."""
    raw, out = data / "synthetic-large-raw", data / "synthetic-large"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    run = sampled_run([sys.executable, str(REPO / "jobs" / "prepare.py"), "--config",
                       str(REPO / "configs" / "synthetic" / "large.yaml"),
                       "--set", f"data.source.path={raw}", "--set", f"data.output_dir={out}"])
    lines = run["output"].splitlines()
    if run["returncode"] != 0:
        print("\n".join(lines[-40:]))
        raise SystemExit("preparing the synthetic large preset failed")
    summary = lines[next(i for i, line in enumerate(lines) if line.startswith("== prepare summary")):]
    return {"summary": summary, **{k: run[k] for k in ("wall_s", "cpu_s", "peak_gib", "load")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="10M and 100M events (long)")
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000], help="the sizes (two to compare)")
    parser.add_argument("--items", type=int, default=None, help="a fixed catalog for every size (default: "
                        "events / 25 items, a catalog that grows with the log): memory then follows the data alone")
    parser.add_argument("--steps", type=int, default=300, help="training steps (of 128 users) per size")
    parser.add_argument("--eval-users", type=float, default=0.01, help="eval.users: share of held-out users ranked")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="what to run (default: "
                        "prepare, train, serve, and synthetic with --full); a stage uses what an earlier run left")
    parser.add_argument("--requests", type=int, default=400, help="serve: requests per endpoint")
    parser.add_argument("--data", type=Path, default=REPO / "outputs" / "bench-data")
    parser.add_argument("--sides", nargs="+", choices=["polars-streaming", "genrec-ray"],
                        default=["polars-streaming", "genrec-ray"], help="prepare with (genrec-ray is needed to train)")
    args = parser.parse_args()
    sizes = [10_000_000, 100_000_000] if args.full else sorted(args.events)
    args.stages = args.stages or [s for s in STAGES if args.full or s != "synthetic"]
    print(f"machine: {machine()}", flush=True)
    prepared, trained, served = {}, {}, {}
    for events in sizes:
        if "prepare" in args.stages:
            prepared[events] = prepare_both(events, args.items, args.data, args.sides)
        if "train" in args.stages:
            trained[events] = train(tag(events, args.items), args.data, args.steps, args.eval_users)
            print(f"{events:,} events, train: {json.dumps(trained[events])}", flush=True)
        if "serve" in args.stages:
            served[events] = serve(tag(events, args.items), args.data, args.requests)
            print(f"{events:,} events, serve: {json.dumps(served[events])}", flush=True)
    generated = synthetic(args.data) if "synthetic" in args.stages else None
    print_tables(args, sizes, prepared, trained, served)
    if generated:
        print(f"\nsynthetic `large` preset, generated and prepared: wall {generated['wall_s']:.0f} s, cpu "
              f"{generated['cpu_s']:.0f} s, peak {generated['peak_gib']:.2f} GiB (all processes), load "
              f"{generated['load'][0]:.1f}-{generated['load'][1]:.1f}\n")
        print("\n".join(generated["summary"]))


def print_tables(args, sizes: list[int], prepared: dict, trained: dict, served: dict) -> None:
    if prepared:
        print(f"\nmachine: {machine()}; prepare: each side in its own subprocess, one after the other; "
              f"peak = the largest summed PSS of the process tree, sampled every 0.2 s\n")
        print_prepare_table(prepared)
    if trained:
        print(f"\ntrain: HSTU D=64, 2 blocks, N=50, 2 workers (Ray Data streaming shards), {args.steps} steps of 128 "
              f"users, then eval.users={args.eval_users} of the valid and test users ranked against every item; item "
              "table = its weights, gradient and AdamW moments on one worker (the catalog grows with the log)\n")
        print("| events | items | item table | events/s | train s | eval s | peak GiB (all processes) "
              "| peak GiB (largest worker) | worker less its item table | wall s | progress line |")
        print("|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|:---|")
        for events, r in trained.items():
            print(f"| {events:,} | {r['items']:,} | {r['table']} {r['table_gib']:.2f} GiB | {r['events_per_s']:,.0f} "
                  f"| {r['train_s']:.0f} | {r['eval_s']:.0f} | {r['peak_gib']:.2f} | {r['worker_peak_gib']:.2f} "
                  f"| {r['worker_peak_gib'] - r['table_gib']:.2f} | {r['wall_s']:.0f} | `{r['progress']}` |")
        if len(trained) == 2:
            small, large = sizes
            data_side = [trained[e]["worker_peak_gib"] - trained[e]["table_gib"] for e in (small, large)]
            print(f"\nlargest worker less its item table at {large // small}x the events: "
                  f"{data_side[1] / data_side[0]:.2f}x (flat: ~1.0x)")
    for events, r in served.items():
        print(f"\nserve, {events:,} events: {r['model']}; peak {r['peak_gib']:.2f} GiB (all processes), largest "
              f"replica {r['worker_peak_gib']:.2f} GiB, wall {r['wall_s']:.0f} s (start, load, requests)\n")
        print("| endpoint | requests | concurrency | QPS | p50 ms | p95 ms | p99 ms | vs baseline | lost |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(r["rows"]))


def print_prepare_table(prepared: dict) -> None:
    print("| events | side | wall s | cpu s | wall / polars-streaming | peak GiB | load | rejected | duplicates "
          "| merged | users | same counts |")
    print("|---:|:---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|:---:|")
    keys = ("input_rows", "rejected", "users", "duplicates", "merged")
    for events, results in prepared.items():
        polars = results.get("polars-streaming")
        for side, r in results.items():
            if r is None:
                print(f"| {events:,} | {side} | failed | | | | | | | | | |")
                continue
            same = polars is not None and all(r[k] == polars[k] for k in keys)
            ratio = f"{r['wall_s'] / polars['wall_s']:.2f}" if polars else "-"
            print(f"| {r['input_rows']:,} | {side} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {ratio} | "
                  f"{r['peak_gib']:.2f} | {r['load'][0]:.1f}-{r['load'][1]:.1f} | {r['rejected']:,} | "
                  f"{r['duplicates']:,} | {r['merged']:,} | {r['users']:,} | {'yes' if same else 'NO'} |")

if __name__ == "__main__":
    main()
