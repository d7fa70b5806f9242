"""Benchmark: the Ray Data pipeline vs a single-process pyarrow baseline doing the same work.

    python benchmarks/data_pipeline.py [--events 1000000 10000000]

Both start from the same generated Parquet event log (generation is not timed)
and do the same work with the same functions: validate and canonicalize every
row, build vocabularies, map to dense ids, sort per user with the tie-break, drop
duplicates, merge same-impression actions, attach context, cut leave-one-out
splits and write Parquet. The baseline holds everything in one table in one
process; the pipeline is genrec.data.pipeline.prepare on a local 2-CPU Ray cluster.
Each side runs in its own subprocess; peak memory is the largest sum of PSS over
that process and all its children (Ray's raylet, workers and object store included),
sampled every 0.2 s. The outputs are checked to hold the same sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USERS_PER_MILLION = 20_000  # with 50 events per user on average


def source_spec(events: int) -> dict:
    return {"kind": "synthetic", "num_users": max(1, events * USERS_PER_MILLION // 1_000_000), "num_items": 50_000,
            "mean_events_per_user": 50, "num_shards": 16, "seed": 0,
            "path": str(REPO / "outputs" / "raw" / f"bench-{events}")}


def run_baseline(events: int, out: Path) -> dict:
    """Single process, no Ray: the same per-row and per-user functions over one table."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from genrec.config import DataConfig
    from genrec.data.adapters import plan_source, read_chunk
    from genrec.data.sequences import build_sequences, make_splits

    cfg = DataConfig.model_validate({"source": source_spec(events), "output_dir": str(out), "item_universe": "observed"})
    plan = plan_source(cfg)
    started = time.time()
    parts = [read_chunk(chunk, cfg, plan.action_lookup, None) for chunk in plan.chunks]
    events_table = pa.concat_tables(p[0] for p in parts)
    rejects = pa.concat_tables(p[1] for p in parts)
    users = pc.unique(events_table["user_id"]).sort()
    items = pc.unique(events_table["item_id"]).sort()
    dense = pa.table({
        "user": pc.add(pc.index_in(events_table["user_id"], value_set=users), 1),
        "item": pc.add(pc.index_in(events_table["item_id"], value_set=items), 1),
        **{k: events_table[k] for k in ("timestamp", "action", "value", "source_order")},
    })
    del events_table
    sequences, stats = build_sequences(dense, plan.merge_actions)
    lookup = pc.index_in(users, value_set=plan.users["user_id"]).to_numpy()
    for name in plan.context_columns:
        values = pc.unique(pc.cast(plan.users[name], pa.string())).sort()
        ids = pc.add(pc.index_in(pc.cast(plan.users[name], pa.string()), value_set=values), 1).to_numpy()
        sequences = sequences.append_column(name, pa.array(np.concatenate([[0], ids[lookup]]).astype(np.int32)[sequences["user"].to_numpy()]))
    splits, _ = make_splits(sequences, cfg.split)
    out.mkdir(parents=True)
    pq.write_table(sequences, out / "sequences.parquet")
    pq.write_table(rejects, out / "rejects.parquet")
    for name, table in splits.items():
        pq.write_table(table, out / f"{name}.parquet")
    return {"seconds": time.time() - started, "events": sum(p[2] for p in parts), "users": sequences.num_rows,
            "duplicates": stats["duplicates"], "merged": stats["merged"]}


def run_ray(events: int, out: Path) -> dict:
    import ray

    from genrec.config import DataConfig
    from genrec.data.adapters import plan_source
    from genrec.data.pipeline import prepare

    ray.init(num_cpus=2, object_store_memory=2 << 30, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = DataConfig.model_validate({"source": source_spec(events), "output_dir": str(out), "item_universe": "observed"})
    plan_source(cfg)  # generation happens here, untimed (cached)
    started = time.time()
    summary = prepare(cfg, log=lambda *_: None)
    return {"seconds": time.time() - started, "events": summary["input_rows"], "users": summary["users"],
            "duplicates": summary["duplicates_dropped"], "merged": summary["merged_into_bitmask"]}


def measured(mode: str, events: int, out: Path) -> dict:
    """Run one side in a subprocess, sampling the PSS of its whole process tree."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--run", mode, "--events", str(events), "--out", str(out)],
                            stdout=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{output}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_gib"] = peak / (1 << 30)
    return result


def same_sequences(baseline_out: Path, ray_out: Path) -> bool:
    import pyarrow.parquet as pq

    base = pq.read_table(baseline_out / "sequences.parquet").sort_by("user")
    ray_table = pq.read_table(ray_out / "sequences").sort_by("user")
    return base.select(["user", "items", "actions", "timestamps"]).equals(ray_table.select(["user", "items", "actions", "timestamps"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--run", choices=["baseline", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        runner = run_baseline if args.run == "baseline" else run_ray
        print(json.dumps(runner(args.events[0], args.out)))
        return

    import shutil
    import tempfile

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB, Python {platform.python_version()}")
    rows = []
    for events in args.events:
        with tempfile.TemporaryDirectory(dir=REPO / "outputs" if (REPO / "outputs").exists() else None) as tmp:
            tmp = Path(tmp)
            subprocess.run([sys.executable, "-c", f"from genrec.config import SyntheticSource; import ray; "
                            f"ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False); "
                            f"from genrec.data.synthetic import generate; generate(SyntheticSource(**{source_spec(events)!r}))"],
                           check=True, capture_output=True)
            base = measured("baseline", events, tmp / "baseline")
            ours = measured("ray", events, tmp / "ray")
            assert base["events"] == ours["events"] and base["users"] == ours["users"], (base, ours)
            rows.append((events, base, ours, same_sequences(tmp / "baseline", tmp / "ray")))
            shutil.rmtree(tmp / "baseline")
            shutil.rmtree(tmp / "ray")
    print()
    print("| input events | baseline (1 process) s | Ray pipeline (2 CPUs) s | time ratio Ray/baseline "
          "| baseline events/s | Ray events/s | baseline peak GiB | Ray peak GiB | same sequences |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for _, base, ours, same in rows:
        n = base["events"]
        print(f"| {n:,} | {base['seconds']:.1f} | {ours['seconds']:.1f} | {ours['seconds'] / base['seconds']:.2f} "
              f"| {n / base['seconds']:,.0f} | {n / ours['seconds']:,.0f} | {base['peak_gib']:.2f} | {ours['peak_gib']:.2f} "
              f"| {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
