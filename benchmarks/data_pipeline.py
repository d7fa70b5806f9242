"""Benchmark: genrec's Ray pipeline vs the single-process polars script a user would write instead.

    python benchmarks/data_pipeline.py [--events 1000000 10000000] [--formats csv parquet] [--repeat N]
    python benchmarks/data_pipeline.py --stages    # CPU seconds of each genrec stage, in one process
    python benchmarks/data_pipeline.py --events 100000000 --formats csv --sides polars-streaming genrec-ray

Input: a generated behaviour log shaped like the public e-commerce one (user, item,
category, behavior in pv/cart/fav/buy, ts in Unix seconds; ~100 events per user,
Zipf-like items), with planted same-impression actions (merged into a bitmask),
exact duplicates (dropped) and bad rows (rejected with their row numbers), as CSV
with a header and as Parquet. Generation is not timed.

Four sides do the same work (validate with rejects, drop duplicates, merge
same-impression actions into a bitmask, vocabularies, time-sorted sequences with the
source-order tie-break, leave-one-out splits, Parquet out):

- polars: the script a user would write (`polars_prepare` below: one lazy query), one process,
  polars' own threads on every core, its in-memory engine (the whole log in memory);
- polars-streaming: the same query on polars' streaming engine (scanned, processed and sunk to
  Parquet in batches where its operators allow): polars' answer for logs larger than memory;
- genrec in-process: genrec's own functions (read_chunk, build_sequences,
  make_splits) run one after the other in one process, no Ray;
- genrec Ray: `genrec.data.pipeline.prepare` on a local 2-CPU Ray cluster.

Each side runs in its own subprocess. "wall" is that subprocess from start to exit
(imports, Ray start-up and shutdown included); genrec Ray also reports the time
inside prepare(). Peak memory is the largest sum of PSS over the process and all its
children (Ray's raylet, GCS, workers and object store included), sampled every 0.2 s;
"cpu" the user + system seconds of that tree, which a shared machine's load distorts
less than wall time. The load average is printed with every side; with --repeat the
sides take turns, so the load falls on all of them, and the median run is reported.
The sequences of all sides are checked to be the same (raw user id -> raw item ids,
actions, timestamps) and the reject counts equal.
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
ACTIONS = ["pv", "cart", "fav", "buy"]
T0, SPAN = 1_511_539_200, 9 * 86_400  # 2017-11-25, nine days
T_MIN, T_MAX = T0, T0 + SPAN


GENERATED_CHUNK = 10_000_000  # rows generated at a time: the generator's memory stays flat above it


def generate(events: int, folder: Path, items: int | None = None) -> None:
    """behaviour.csv and behaviour.parquet with the same rows (same generator, same seed), written in
    chunks of GENERATED_CHUNK rows (users and items drawn from the whole log's ranges in every chunk;
    duplicates and same-impression actions planted within a chunk). A catalog of events / 25 items,
    unless `items` fixes it."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    chunks = -(-events // GENERATED_CHUNK)
    users, items = max(1, events // 100), items or max(10, events // 25)
    csv_writer = parquet_writer = None
    for k in range(chunks):
        rows = min(GENERATED_CHUNK, events - k * GENERATED_CHUNK)
        table = _generated_chunk(rows, users, items, seed=0 if chunks == 1 else [0, k])
        if csv_writer is None:
            csv_writer = pacsv.CSVWriter(folder / "behaviour.csv", table.schema,
                                         write_options=pacsv.WriteOptions(quoting_style="none"))
            parquet_writer = pq.ParquetWriter(folder / "behaviour.parquet", table.schema)
        csv_writer.write_table(table)
        parquet_writer.write_table(table, row_group_size=1 << 20)
    csv_writer.close()
    parquet_writer.close()


def _generated_chunk(events: int, users: int, items: int, seed):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    base = int(events * 0.97)
    user = rng.integers(1, users + 1, base)
    item = (items * rng.random(base) ** 2.5).astype(np.int64) + 1  # a few items take most events
    ts = T0 + rng.integers(0, SPAN, base)
    action = rng.choice(4, base, p=[0.89, 0.05, 0.035, 0.025])
    n_merge, n_dup = int(events * 0.02), events - base - int(events * 0.02)
    pick_m, pick_d = rng.integers(0, base, n_merge), rng.integers(0, base, n_dup)
    user = np.concatenate([user, user[pick_m], user[pick_d]])
    item = np.concatenate([item, item[pick_m], item[pick_d]])
    ts = np.concatenate([ts, ts[pick_m], ts[pick_d]])
    action = np.concatenate([action, (action[pick_m] + 1 + rng.integers(0, 3, n_merge)) % 4, action[pick_d]])
    order = rng.permutation(len(user))  # extra events land anywhere in the chunk
    user, item, ts, action = user[order], item[order], ts[order], action[order]
    table = pa.table({
        "user": pc.cast(pa.array(user), pa.string()),
        "item": pc.cast(pa.array(item), pa.string()),
        "category": pc.cast(pa.array(item % 9_439 + 1), pa.string()),
        "behavior": pa.array(np.array(ACTIONS)[action]),
        "ts": pc.cast(pa.array(ts), pa.string()),
    })
    bad = rng.choice(len(user), max(3, events // 10_000), replace=False)  # 0.01% bad rows, three kinds
    columns = dict(zip(table.column_names, table.columns))
    for kind, (name, edit) in enumerate([("user", lambda v: pc.binary_join_element_wise("u", v, "")),  # not an integer
                                         ("ts", lambda v: pc.binary_join_element_wise(v, "000", "")),  # ms: out of range
                                         ("behavior", lambda v: pc.if_else(pc.is_valid(v), "like", v))]):  # unknown action
        mask = np.zeros(len(user), dtype=bool)
        mask[np.sort(bad[kind::3])] = True
        column = columns[name].combine_chunks()
        columns[name] = pc.replace_with_mask(column, pa.array(mask), edit(column.filter(pa.array(mask))))
    return pa.table(columns)


def genrec_data_config(fmt: str, folder: Path, out: Path) -> dict:
    return {
        "source": {"kind": fmt, "path": str(folder / f"behaviour.{fmt}"),
                   "columns": {"user_id": "user", "item_id": "item", "timestamp": "ts", "action": "behavior"},
                   "actions": {"names": ACTIONS, "merge_same_impression": True}},
        "output_dir": str(out), "timestamp_min": T_MIN, "timestamp_max": T_MAX,
    }


# ----------------------------------------------------------------------------- the three sides

def polars_plan(raw):
    """What a user would write with polars, as one lazy query: {output name: LazyFrame} and
    {count name: LazyFrame of one number}. `raw` has a "row" column (the source row number)."""
    import polars as pl

    typed = raw.with_columns(
        pl.col("user").cast(pl.Int64, strict=False).alias("user_id"),
        pl.col("item").cast(pl.Int64, strict=False).alias("item_id"),
        pl.col("ts").cast(pl.Int64, strict=False).alias("timestamp"),
        pl.col("behavior").replace_strict({a: i for i, a in enumerate(ACTIONS)}, default=None,
                                          return_dtype=pl.Int32).alias("action"),
    )
    reason = (pl.when(pl.col("user_id").is_null()).then(pl.lit("user_id is not an integer"))
              .when(pl.col("item_id").is_null()).then(pl.lit("item_id is not an integer"))
              .when(pl.col("timestamp").is_null()).then(pl.lit("timestamp is not an integer"))
              .when((pl.col("timestamp") < T_MIN) | (pl.col("timestamp") > T_MAX)).then(pl.lit("timestamp out of range"))
              .when(pl.col("action").is_null()).then(pl.lit("unknown action")))
    typed = typed.with_columns(reason.alias("reason"))
    rejects = typed.filter(pl.col("reason").is_not_null()).select("row", "reason")
    ok = typed.filter(pl.col("reason").is_null()).select("row", "user_id", "item_id", "timestamp", "action")
    deduped = ok.unique(["user_id", "item_id", "timestamp", "action"], keep="first", maintain_order=True)
    merged = deduped.group_by("user_id", "item_id", "timestamp").agg(
        pl.lit(2, pl.Int32).pow(pl.col("action")).bitwise_or().alias("action"),
        pl.col("row").min())
    users = merged.select(pl.col("user_id").unique().sort()).with_row_index("user", offset=1)
    items = merged.select(pl.col("item_id").unique().sort()).with_row_index("item", offset=1)
    sequences = (merged.join(users, on="user_id").join(items, on="item_id")
                 .sort("user", "timestamp", "row")
                 .group_by("user", maintain_order=True)
                 .agg(pl.col("item").alias("items"), pl.col("action").alias("actions"), pl.col("timestamp").alias("timestamps")))
    n = pl.col("items").list.len()
    lists = ["items", "actions", "timestamps"]
    train = sequences.with_columns([pl.when(n >= 3).then(pl.col(c).list.head(n - 2)).otherwise(pl.col(c)) for c in lists])
    evaluated = sequences.filter(n >= 3)
    valid = evaluated.with_columns([pl.col(c).list.head(n - 1) for c in lists]).with_columns(eval_start=n - 1)
    test = evaluated.with_columns(eval_start=n - 1)
    outputs = {"sequences": sequences, "train": train, "valid": valid, "test": test, "rejects": rejects,
               "users": users, "items": items}
    counts = {"input_rows": raw, "rejected": rejects, "users": sequences, "ok": ok, "deduped": deduped,
              "merged_rows": merged}
    return outputs, {name: frame.select(pl.len()) for name, frame in counts.items()}


def polars_prepare(path: Path, out: Path, streaming: bool = False) -> dict:
    """polars_plan on `path`: with polars' in-memory engine (the whole log in memory), or with its
    streaming engine (scan, process and sink in batches: what polars offers for logs larger than memory)."""
    import polars as pl

    scan = pl.scan_csv(path, infer_schema=False) if path.suffix == ".csv" else pl.scan_parquet(path)
    raw = scan.with_row_index("row", offset=2 if path.suffix == ".csv" else 1)  # CSV row 1 is the header
    outputs, counts = polars_plan(raw)
    out.mkdir(parents=True)
    if streaming:
        sinks = [frame.sink_parquet(out / f"{name}.parquet", lazy=True) for name, frame in outputs.items()]
        numbers = pl.collect_all([*sinks, *counts.values()], engine="streaming")[len(sinks):]
    else:
        frames = pl.collect_all([*outputs.values(), *counts.values()], engine="in-memory")
        for name, frame in zip(outputs, frames):
            frame.write_parquet(out / f"{name}.parquet")
        numbers = frames[len(outputs):]
    n = {name: frame.item() for name, frame in zip(counts, numbers)}
    return {"input_rows": n["input_rows"], "rejected": n["rejected"], "users": n["users"],
            "duplicates": n["ok"] - n["deduped"], "merged": n["deduped"] - n["merged_rows"]}


def polars_streaming_prepare(path: Path, out: Path) -> dict:
    return polars_prepare(path, out, streaming=True)


def genrec_in_process(path: Path, out: Path) -> dict:
    """genrec's own functions in one process, one after the other (no Ray)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from genrec.config import DataConfig, LeaveOneOutSplit
    from genrec.data.adapters import plan_source, read_chunk
    from genrec.data.sequences import build_sequences, make_splits

    cfg = DataConfig.model_validate(genrec_data_config(path.suffix[1:], path.parent, out))
    plan = plan_source(cfg)
    parts = [read_chunk(chunk, plan.rules) for chunk in plan.chunks]
    events = pa.concat_tables(p[0] for p in parts)
    rejects = pa.concat_tables(p[1] for p in parts)
    users = pc.unique(events["user_id"]).sort()
    items = pc.unique(events["item_id"]).sort()
    dense = pa.table({
        "user": pc.add(pc.index_in(events["user_id"], value_set=users), 1),
        "item": pc.add(pc.index_in(events["item_id"], value_set=items), 1),
        **{k: events[k] for k in ("timestamp", "action", "value", "source_order")},
    })
    del events
    sequences, stats = build_sequences(dense, plan.merge_actions)
    splits, _ = make_splits(sequences, LeaveOneOutSplit())
    out.mkdir(parents=True)
    for name, table in {"sequences": sequences, "rejects": rejects, **splits}.items():
        pq.write_table(table, out / f"{name}.parquet")
    pq.write_table(pa.table({"user_id": users}), out / "users.parquet")
    pq.write_table(pa.table({"item_id": items}), out / "items.parquet")
    return {"input_rows": sum(p[3] for p in parts), "rejected": rejects.num_rows, "users": sequences.num_rows,
            "duplicates": stats["duplicates"], "merged": stats["merged"]}


def genrec_ray(path: Path, out: Path) -> dict:
    import ray

    from genrec.config import DataConfig
    from genrec.data.pipeline import prepare

    for attempt in range(5):  # on a loaded machine the raylet can miss Ray's fixed 30 s start-up deadline
        try:
            ray.init(num_cpus=2, object_store_memory=2 << 30, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 4:
                raise
            time.sleep(20)
    cfg = DataConfig.model_validate(genrec_data_config(path.suffix[1:], path.parent, out))
    started = time.time()
    summary = prepare(cfg, log=lambda *_: None)
    inside = time.time() - started
    return {"input_rows": summary["input_rows"], "rejected": summary["rejected"], "users": summary["users"],
            "duplicates": summary["duplicates_dropped"], "merged": summary["merged_into_bitmask"], "inside_s": inside}


def stage_profile(path: Path, out: Path) -> None:
    """CPU seconds of each stage of genrec's pipeline, its task functions run one after the other in
    this process (no Ray): where the work is, whatever the machine's load."""
    import shutil

    from genrec.config import DataConfig
    from genrec.data import pipeline
    from genrec.data.adapters import plan_source
    from genrec.data.prepared import REJECTS, SEQUENCES, SPLITS

    cfg = DataConfig.model_validate(genrec_data_config(path.suffix[1:], path.parent, out))
    staging = out / "staging"
    for sub in (REJECTS, SEQUENCES, *SPLITS, "_item_features"):
        (staging / sub).mkdir(parents=True)
    times, clock = {}, time.process_time()

    def lap(name):
        nonlocal clock
        times[name], clock = time.process_time() - clock, time.process_time()

    plan = plan_source(cfg)
    lap(f"plan the source ({len(plan.chunks)} chunks, sha256)")
    for index in range(len(plan.chunks)):
        pipeline.canonicalize_chunk(index, plan, cfg, None, staging)
    lap("1 canonicalize: parse, validate, partition")
    parts = [pipeline.partition_vocabulary(p, staging, False) for p in range(cfg.num_partitions)]
    vocab = pipeline._vocabularies(plan, "observed", parts)
    lap("2 vocabularies (tasks + driver merge)")
    for p in range(cfg.num_partitions):
        pipeline.partition_sequences(p, staging, vocab, cfg, plan.merge_actions, None)
    lap("3 sequences, splits, Parquet out")
    shutil.rmtree(out)
    print(f"\nCPU seconds per stage, {path.name}, one process; machine: {machine()}, load average "
          f"{os.getloadavg()[0]:.1f}\n\n| stage | cpu s |\n|:---|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"| total | {sum(times.values()):.2f} |")


SIDES = {"polars": polars_prepare, "polars-streaming": polars_streaming_prepare, "genrec-1proc": genrec_in_process,
         "genrec-ray": genrec_ray}


# ----------------------------------------------------------------------------- measuring

def sampled_run(command: list[str], worker_name: str | None = None) -> dict:
    """Run `command`, sampling every 0.2 s the PSS of its whole process tree: its exit code and standard
    output (through a file; standard error is this process's), wall and CPU seconds (user + system of the whole tree, which a
    shared machine's load distorts less), the peak of the tree's summed PSS, the largest PSS of any one
    process whose name contains `worker_name` (e.g. Ray Train's workers), and the load average."""
    import tempfile

    import psutil

    load = os.getloadavg()[0]
    started = time.time()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, text=True)
        root = psutil.Process(proc.pid)
        peak = worker_peak = 0
        cpu = {}  # pid -> user + system seconds, last seen: the CPU time of the whole tree, load-independent
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        pss = p.memory_full_info().pss
                        total += pss
                        if worker_name and worker_name in p.name():
                            worker_peak = max(worker_peak, pss)
                        times = p.cpu_times()
                        cpu[p.pid] = times.user + times.system
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            peak = max(peak, total)
            time.sleep(0.2)
        log.seek(0)
        output = log.read()
    return {"returncode": proc.returncode, "output": output, "wall_s": time.time() - started,
            "peak_gib": peak / (1 << 30), "worker_peak_gib": worker_peak / (1 << 30), "cpu_s": sum(cpu.values()),
            "load": (load, os.getloadavg()[0])}


def measured(side: str, path: Path, out: Path) -> dict | None:
    """Run one side in a subprocess (sampled_run): its summary, wall, CPU, peak memory and load."""
    run = sampled_run([sys.executable, __file__, "--run", side, "--input", str(path), "--out", str(out)])
    if run["returncode"] != 0:
        print(f"{side} failed on {path}:\n{run['output'][-4000:]}", flush=True)
        return None
    result = json.loads(run["output"].strip().splitlines()[-1])
    result.update({k: run[k] for k in ("wall_s", "peak_gib", "cpu_s", "load")})
    return result


def sequences_by_raw_id(side: str, out: Path):
    """(raw user id, raw item ids, actions, timestamps) sorted by raw user id: comparable across sides."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if side == "genrec-ray":
        from genrec.data.prepared import data_location, read_split

        seqs = read_split(out, "sequences")
        vocab = data_location(out).local_path() / "vocab"
        users = pq.read_table(vocab / "users.parquet")["user_id"]
        items = pq.read_table(vocab / "items.parquet")["item_id"]
    else:
        seqs = pq.read_table(out / "sequences.parquet")
        users = pq.read_table(out / "users.parquet")["user_id"]
        items = pq.read_table(out / "items.parquet")["item_id"]
    items = items.combine_chunks()
    item_lists = seqs["items"].combine_chunks()
    raw_items = pa.ListArray.from_arrays(item_lists.offsets, pc.take(items, pc.subtract(item_lists.values, 1)))
    table = pa.table({
        "user_id": pc.take(users, pc.subtract(pc.cast(seqs["user"], pa.int64()), 1)),
        "items": raw_items,
        "actions": pc.cast(seqs["actions"], pa.list_(pa.int32())),
        "timestamps": pc.cast(seqs["timestamps"], pa.list_(pa.int64())),
    })
    return table.sort_by("user_id")


def machine() -> str:
    from genrec.reports import cpu_model  # genrec is imported inside the functions: each side times its own imports

    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"{platform.machine()} {cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--formats", nargs="+", choices=["csv", "parquet"], default=["csv", "parquet"])
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument("--repeat", type=int, default=1, help="runs per side, taking turns; the median is reported")
    parser.add_argument("--stages", action="store_true", help="only the CPU seconds of each genrec stage, in one process")
    parser.add_argument("--data", type=Path, default=REPO / "outputs" / "bench-data", help="generated inputs (kept)")
    parser.add_argument("--run", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(SIDES[args.run](args.input, args.out)))
        return

    import shutil
    import tempfile

    if args.stages:
        for events in args.events:
            folder = args.data / f"behaviour-{events}"
            if not (folder / "behaviour.parquet").exists():
                generate(events, folder)
            for fmt in args.formats:
                with tempfile.TemporaryDirectory(dir=args.data) as tmp:
                    stage_profile(folder / f"behaviour.{fmt}", Path(tmp) / "out")
        return
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}")
    rows = []
    for events in args.events:
        folder = args.data / f"behaviour-{events}"
        if not (folder / "behaviour.parquet").exists():
            generate(events, folder)
        for fmt in args.formats:
            path = folder / f"behaviour.{fmt}"
            with tempfile.TemporaryDirectory(dir=args.data) as tmp:
                runs = {side: [] for side in args.sides}
                for repeat in range(args.repeat):  # sides take turns, so a shared machine's load falls on all of them
                    for side in args.sides:
                        shutil.rmtree(Path(tmp) / side, ignore_errors=True)
                        result = measured(side, path, Path(tmp) / side)
                        print(f"{events:,} rows, {fmt}, {side}, run {repeat + 1}: {json.dumps(result)}", flush=True)
                        if result is not None:
                            runs[side].append(result)
                results = {}
                for side, done in runs.items():
                    if done:  # the median run by wall time; peak memory: the largest of all runs
                        r = dict(sorted(done, key=lambda d: d["wall_s"])[(len(done) - 1) // 2])
                        r.update(runs=len(done), peak_gib=max(d["peak_gib"] for d in done),
                                 best_s=min(d["wall_s"] for d in done),
                                 load=(min(d["load"][0] for d in done), max(max(d["load"]) for d in done)))
                        results[side] = r
                if not results:
                    continue
                first = next(iter(results))
                reference = sequences_by_raw_id(first, Path(tmp) / first)
                for side, r in results.items():
                    same = all(r[k] == results[first][k] for k in ("input_rows", "rejected", "users", "duplicates", "merged"))
                    r["same"] = same and sequences_by_raw_id(side, Path(tmp) / side).equals(reference)
                rows.append((events, fmt, path.stat().st_size, results))
            print(f"done: {events:,} rows, {fmt}", {s: round(r["wall_s"], 1) for s, r in results.items()}, flush=True)
    print()
    print(f"Baseline: a single-process polars {__import__('polars').__version__} script (polars_prepare: its in-memory "
          f"engine, or with polars-streaming its streaming engine; the ratios are to the in-memory side where it ran) on "
          f"the same input; machine: {machine()}; load average (1 min) now {os.getloadavg()[0]:.1f}")
    print(f"wall and cpu: the median of {args.repeat} run(s) per side, sides taking turns; best: the fastest run (on a "
          "shared machine the closest to an idle one); cpu = user + system seconds of the whole process tree; load = the "
          "1-minute load average over the side's runs (lowest start, highest end)")
    print()
    print("| rows | input | side | wall s | inside prepare s | cpu s | events/s (wall) | wall / polars | best s "
          "| best / polars | cpu / polars | peak GiB | load | rejected | duplicates | merged | users | same sequences |")
    print("|---:|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|:---:|")
    for events, fmt, size, results in rows:
        polars = results.get("polars") or results.get("polars-streaming") or {}  # the baseline: in-memory if run
        for side, r in results.items():
            ratio = f"{r['wall_s'] / polars['wall_s']:.2f}" if polars else "-"
            cpu_ratio = f"{r['cpu_s'] / polars['cpu_s']:.2f}" if polars else "-"
            best_ratio = f"{r['best_s'] / polars['best_s']:.2f}" if polars else "-"
            inside = f"{r['inside_s']:.1f}" if "inside_s" in r else "-"
            print(f"| {r['input_rows']:,} | {fmt} ({size / 1e6:,.0f} MB) | {side} | {r['wall_s']:.1f} | {inside} "
                  f"| {r['cpu_s']:.1f} | {r['input_rows'] / r['wall_s']:,.0f} | {ratio} | {r['best_s']:.1f} | {best_ratio} "
                  f"| {cpu_ratio} | {r['peak_gib']:.2f} "
                  f"| {r['load'][0]:.1f}-{r['load'][1]:.1f} | {r['rejected']:,} | {r['duplicates']:,} | {r['merged']:,} "
                  f"| {r['users']:,} | {'yes' if r['same'] else 'NO'} |")
    events, fmt, _, results = max(rows, key=lambda row: row[0])
    if events < 100_000_000:  # not run: a straight line from the largest size measured
        scale = 100_000_000 / events
        in_memory = ("polars", "genrec-1proc")  # the sides whose memory grows with the log
        guesses = ", ".join(f"{side} ~{r['wall_s'] * scale:,.0f} s" + (f" and ~{r['peak_gib'] * scale:.0f} GiB"
                                                                        if side in in_memory else "")
                            for side, r in results.items())
        print(f"\n100M rows ({fmt}), extrapolated linearly from {events:,} (not run): {guesses}; polars and "
              f"genrec-1proc hold the whole log in memory, polars-streaming processes it in batches where its "
              f"operators allow, the Ray pipeline holds one chunk or one partition per task (raise "
              f"data.num_partitions with the data to keep partitions at the measured size).")


if __name__ == "__main__":
    main()
