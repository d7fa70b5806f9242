"""Benchmark: keeping a model fresh while new items enter: refresh rounds against a frozen model and a retrain.

    python benchmarks/refresh_rounds.py --models hstu sasrec --seeds 1 2 3   # the issue's table (5 min a cell)
    python benchmarks/refresh_rounds.py --models hstu --seeds 1              # one model, one seed
    python benchmarks/refresh_rounds.py --quick                              # a tiny world, one seed: ~4 min a model

The world is configs/synthetic/refresh.yaml's (items enter over time, popularity fades), generated once and
written as CSV files: a base period (the first --base-share of the time) and --rounds windows of equal time
after it (events after the world's duration_days are left out). For each model and seed, in a folder of its own:

0. the base period's file is the whole log (a csv data.source over a folder); it is prepared, trained in
   epochs with the preset's recipe, registered and put behind refresh.model's alias;
1. each round r adds window r's file to the folder and makes three models that know window r:
   (a) refreshed: jobs/refresh.py's refresh() on the job config written as refresh-job.yaml (the window in
       refresh.chunks chunks, each ranked, then trained train.window_passes times (the preset: 3), from the
       model behind the alias; gate_margin 0.99, so the chain
       always moves unless the new model is broken: each round's gate decision is reported);
   (b) frozen: the round-0 model, never changed;
   (c) retrained: everything so far prepared anew and trained from scratch with the base's recipe;
   and ranks window r's events with the three models as they stood BEFORE it (trained on data through
   window r-1: (a) the refresh's parent, (b) the base, (c) the retrain of round r-1, the base for r = 1), by
   one function, genrec.train.refresh.score_windows, on the refreshed data: the same targets (every event of
   the window with a history, against the whole catalog), the same histories, the same ties. Each model's
   item table is laid out by raw item id on the refreshed vocabulary; an item a model does not know gets a
   zero row (score 0: see `reordered`). Window r's own new items are unknown to all three; items that entered
   in windows 1..r-1 are unknown to the frozen model only. Beside them, the refresh's own current_windows:
   the same refreshed model as its gate ranks it (genrec's grown table, the items it never knew with zero
   rows): the same numbers as column (a), a check that the benchmark ranks as the platform does.
   Round 1 ranks with the same model three times (all three are the base model): a check, not a result.

Times: a round's refresh (reading and publishing the window, the passes, the frozen model's scoring, the
gate, registering) against its retrain through the same window (prepare + training), wall seconds on the same
local Ray cluster, and the training FLOPs of each (train/flops, the model's forward and backward).
The table (and the raw rows, .json) go to --out and are rewritten after each (model, seed); a re-run skips the
finished ones; an unfinished one starts over.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
import yaml
from mlflow.tracking import MlflowClient

from genrec.artifact import CONFIG, WEIGHTS, model_folder
from genrec.config import ExperimentConfig, load_config
from genrec.data.pipeline import prepare
from genrec.data.prepared import SEQUENCES, VOCAB, read_manifest, read_split, read_vocab
from genrec.data.synthetic import EVENTS_DIR, generate
from genrec.model.growth import state_item_key
from genrec.reports import groups, markdown_table, mean_std, run_grid
from genrec.runtime import init_ray
from genrec.train.refresh import refresh, score_windows
from genrec.train.streaming import DAY
from genrec.train.trainer import fit, workers_view

from data_pipeline import REPO, machine

PRESET = REPO / "configs" / "synthetic" / "refresh.yaml"
QUICK = ["data.source.num_users=800", "data.source.num_items=600", "data.source.mean_events_per_user=25",
         "data.source.num_topics=16", "data.source.duration_days=60", "train.epochs=4"]
ALIAS = "production"
METRICS = ("ndcg@10", "hr@10")
SIDES = ("refreshed", "frozen", "retrain", "refreshed_own")


# ----------------------------------------------------------------------------- the world as an event log

def write_world(preset: ExperimentConfig, folder: Path, rounds: int, base_share: float) -> dict:
    """The preset's synthetic world generated (once) and cut by time into CSV files in folder/files:
    00-base.csv and one file per window; returns (and keeps in windows.json) their time edges and sizes."""
    record = folder / "files" / "windows.json"
    if record.is_file():
        return json.loads(record.read_text())
    source = preset.data.source.model_copy(update={"path": str(folder / "raw")})
    raw = Path(generate(source))
    events = pa.concat_tables(pq.read_table(p) for p in sorted((raw / EVENTS_DIR).glob("*.parquet")))
    start, end = source.start_time, source.start_time + int(source.duration_days * DAY)
    base_end = start + int(base_share * (end - start))
    edges = [start, *np.linspace(base_end, end, rounds + 1).astype(np.int64).tolist()]
    files, sizes = [], []
    for index, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        stamps = events["timestamp"]
        part = events.filter(pc.and_(pc.greater_equal(stamps, low), pc.less(stamps, high)))
        name = "00-base.csv" if index == 0 else f"{index:02d}-window.csv"
        (folder / "files").mkdir(parents=True, exist_ok=True)
        pa_csv.write_csv(part, folder / "files" / name, pa_csv.WriteOptions(quoting_style="none"))
        files.append(name)
        sizes.append(part.num_rows)
    world = {"files": files, "edges": edges, "rows": sizes, "left_out_after_duration": int(
        pc.sum(pc.greater_equal(events["timestamp"], end)).as_py() or 0), "actions": list(source.action_rates)}
    record.write_text(json.dumps(world, indent=1))
    return world


def csv_source(log: Path, actions: list[str]) -> dict:
    """The CSV event log's data.source: the generator's columns and actions (several on one impression merged,
    as the synthetic source's own reader does)."""
    return {"kind": "csv", "path": str(log), "columns": {"action": "action"},
            "actions": {"names": actions, "merge_same_impression": True}}


# ----------------------------------------------------------------------------- configs of one (model, seed)

def experiment(preset: ExperimentConfig, root: Path, world: dict, data: str, registered: str, run_name: str,
               **refresh_keys) -> ExperimentConfig:
    """The preset with the CSV log as its source, every path under root, a registered name and a run name."""
    tree = preset.model_dump(mode="json")
    tree["data"].update(source=csv_source(root / "log", world["actions"]), output_dir=str(root / "data" / data))
    tree["train"].update(storage_path=str(root / "runs"), run_name=run_name)
    tree["tracking"].update(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", registered_model=registered)
    tree["refresh"].update(model=f"models:/{registered}@{ALIAS}", output_dir=str(root / "refreshed"), **refresh_keys)
    return ExperimentConfig.model_validate(tree)


def registered(cfg: ExperimentConfig, version: str) -> tuple[dict, pa.Table, ExperimentConfig]:
    """(weights, item vocabulary: index and item_id, config) of a version of cfg's registered model."""
    name = cfg.tracking.registered_model
    with model_folder(f"models:/{name}/{version}", cfg.tracking.tracking_uri) as folder:
        return (torch.load(folder / WEIGHTS, weights_only=True), pq.read_table(folder / VOCAB / "items.parquet"),
                ExperimentConfig.model_validate_json((folder / CONFIG).read_text()))


def reordered(state: dict, items: pa.Table, vocabulary: pa.Table) -> dict:
    """A state dict whose item table (rows = dense ids of `items`: index, item_id) is reordered to the dense
    ids of `vocabulary`: each item the model knows keeps its row; an item it does not know gets a zero row,
    which the L2-normalised output side scores 0 for every user: one rule for the three models, the one the
    refresh's gate uses for its frozen model (genrec.train.refresh.unknown_rows_zeroed)."""
    key = state_item_key(state)
    table = state[key]
    rows = torch.zeros(vocabulary.num_rows + 1, table.size(1), dtype=table.dtype)
    rows[0] = table[0]
    at = pc.index_in(vocabulary["item_id"], value_set=items["item_id"])
    known = pc.is_valid(at)
    ours = torch.from_numpy(vocabulary["index"].filter(known).to_numpy().astype(np.int64))
    theirs = torch.from_numpy(items["index"].take(at.filter(known)).to_numpy().astype(np.int64))
    rows[ours] = table[theirs]
    return {**state, key: rows}


def pooled(chunks: list[dict]) -> dict:
    """A window's per-chunk metrics -> the window's (target-weighted over its chunks)."""
    targets = sum(c.get("window/targets", 0.0) for c in chunks)
    out = {"targets": int(targets)}
    for metric in METRICS:
        out[metric] = sum(c.get(f"window/{metric}", 0.0) * c["window/targets"] for c in chunks) / targets \
            if targets else float("nan")
    return out


def target_origins(data: str, window_start: int, base_items: int, known_items: int) -> dict:
    """Window targets (events at or after window_start with an earlier event of their user) by where their
    item entered the refreshed vocabulary: the base period, the windows before this one, this window."""
    sequences = read_split(data, SEQUENCES)
    items = sequences["items"].combine_chunks()
    stamps = sequences["timestamps"].combine_chunks().values.to_numpy()
    offsets = items.offsets.to_numpy()
    position = np.arange(len(stamps)) - np.repeat(offsets[:-1], np.diff(offsets))
    ids = items.values.to_numpy()[(stamps >= window_start) & (position > 0)]
    return {"counted": int(len(ids)), "earlier_windows": float(np.mean((ids > base_items) & (ids <= known_items))),
            "this_window": float(np.mean(ids > known_items))}


def gathered_flops(history: list[dict]) -> float:
    return float(sum(h.get("train/flops", 0.0) for h in history))


# ----------------------------------------------------------------------------- one (model, seed)

def run_rounds(preset_path: Path, overrides: list[str], world_dir: Path, world: dict, model: str, seed: int,
               say) -> dict:
    """Base, then every round: refresh, the three models' ranks of the window, the retrain. -> the row."""
    preset = load_config(preset_path, [*overrides, f"model.kind={model}", f"train.seed={seed}"])
    root = world_dir / f"{model}-seed{seed}"
    shutil.rmtree(root, ignore_errors=True)  # an unfinished run starts over: its runs would resume otherwise
    (root / "log").mkdir(parents=True)
    with open(root / "run.log", "a") as lines:  # the runs' own lines; this driver prints one per step
        return rounds_of(preset, root, world_dir, world, model, say, lambda line: print(line, file=lines, flush=True))


def rounds_of(preset: ExperimentConfig, root: Path, world_dir: Path, world: dict, model: str, say, log) -> dict:
    files = world_dir / "files"
    chain = f"refresh-{model}"
    shutil.copy(files / world["files"][0], root / "log")

    base_cfg = experiment(preset, root, world, "base", chain, "base")
    started = time.perf_counter()
    prepare(base_cfg.data, log=log)
    base = fit(base_cfg, log=log)
    base_s = time.perf_counter() - started
    client = MlflowClient(base_cfg.tracking.tracking_uri)
    client.set_registered_model_alias(chain, ALIAS, base["version"])
    say(f"base: {read_manifest(base_cfg.data.output_dir)['num_items']:,} items, {base['epochs_run']} epochs, "
        f"{base_s:.0f} s; registered {chain} version {base['version']} @{ALIAS}")
    job = experiment(preset, root, world, "base", chain, "base", gate_margin=0.99)
    job_file = root / "refresh-job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude_none=True), sort_keys=False))
    job = load_config(job_file)  # what `jobs/refresh.py --config` reads
    base_model = registered(base_cfg, base["version"])[:2]
    base_items = base_model[1].num_rows
    retrained = base_model  # round 0's retrain is the base

    rounds = []
    for r in range(1, len(world["files"])):
        shutil.copy(files / world["files"][r], root / "log")
        started = time.perf_counter()
        result = refresh(job, log=log)
        refresh_s = time.perf_counter() - started
        scoring = workers_view(registered(job, result["version"])[2])  # the refresh run's: the refreshed data
        parent = registered(job, result["parent_version"])[:2]  # the refreshed model as it stood before the window
        window_start = result["window"][0]
        vocabulary = read_vocab(result["data"], "items")
        scored = {side: pooled(score_windows(scoring, reordered(*weights, vocabulary), window_start))
                  for side, weights in (("refreshed", parent), ("frozen", base_model), ("retrain", retrained))}
        known = vocabulary.num_rows - result["new_items"]
        origins = target_origins(result["data"], window_start, base_items, known)

        retrain_cfg = experiment(preset, root, world, f"retrain-{r}", f"retrain-{model}", f"retrain-{r}")
        started = time.perf_counter()
        prepare(retrain_cfg.data, log=log)
        again = fit(retrain_cfg, log=log)
        retrain_s = time.perf_counter() - started
        retrained = registered(retrain_cfg, again["version"])[:2]

        row = {"window": r, **origins, "new_items": result["new_items"], "items": vocabulary.num_rows, **scored,
               "refreshed_own": pooled(result["current_windows"]),
               "refresh_s": refresh_s, "retrain_s": retrain_s, "retrain_epochs": again["epochs_run"],
               "refresh_flops": gathered_flops(result["history"]), "retrain_flops": gathered_flops(again["history"]),
               "outcome": result["outcome"], "gate": result["gate"]["reason"]}
        rounds.append(row)
        a, b, c, m = (row[k] for k in ("refreshed", "frozen", "retrain", "refreshed_own"))
        say(f"window {r}: {a['targets']:,} targets ({origins['counted']:,} counted), {origins['earlier_windows']:.1%} "
            f"on items of earlier windows, {origins['this_window']:.1%} on this window's; ndcg@10 refreshed "
            f"{a['ndcg@10']:.4f} frozen {b['ndcg@10']:.4f} retrain {c['ndcg@10']:.4f} (the refresh's own, grown "
            f"rows: {m['ndcg@10']:.4f}); refresh {refresh_s:.0f} s, retrain {retrain_s:.0f} s "
            f"({again['epochs_run']} epochs); {result['outcome']}")
    return {"base_s": base_s, "base_epochs": base["epochs_run"], "base_items": base_items, "rounds": rounds}


# ----------------------------------------------------------------------------- the tables

def ratio(top: float, bottom: float) -> float:
    return top / bottom if bottom else float("nan")


def per_window(rows: list[dict]) -> dict:
    """{(model, window): [that window's round of each seed]}."""
    out = {}
    for row in rows:
        for rnd in row["rounds"]:
            flat = {f"{side}/{k}": v for side in SIDES for k, v in rnd[side].items()}
            flat.update({k: v for k, v in rnd.items() if not isinstance(v, dict)})
            for side in ("refreshed/retrain", "refreshed/frozen"):
                top, bottom = side.split("/")
                for metric in METRICS:
                    flat[f"{side} {metric}"] = ratio(rnd[top][metric], rnd[bottom][metric])
            flat["time ratio"] = ratio(rnd["refresh_s"], rnd["retrain_s"])
            flat["flops ratio"] = ratio(rnd["refresh_flops"], rnd["retrain_flops"])
            out.setdefault((row["model"], rnd["window"]), []).append(flat)
    return out


def table(rows: list[dict]) -> str:
    windows = per_window(rows)
    seeds = {model: sorted(r["seed"] for r in runs) for model, runs in groups(rows, "model").items()}
    quality = [[model, str(w), mean_std(runs, "refreshed/targets", 0), mean_std(runs, "earlier_windows", 3),
                mean_std(runs, "this_window", 3),
                *(mean_std(runs, f"{side}/{m}") for m in METRICS for side in SIDES)]
               for (model, w), runs in windows.items()]
    ratios = [[model, str(w), *(mean_std(runs, f"{side} {m}", 3) for side in ("refreshed/retrain", "refreshed/frozen")
                                for m in METRICS),
               mean_std(runs, "time ratio", 3), mean_std(runs, "flops ratio", 3), mean_std(runs, "refresh_s", 0),
               mean_std(runs, "retrain_s", 0), " ".join(sorted({r["outcome"] for r in runs}))]
              for (model, w), runs in windows.items()]
    seeds_text = "; ".join(f"{m}: seeds {s}" for m, s in seeds.items())
    return (markdown_table(
        f"Each window ranked by the three models as they stood before it (mean ± std over seeds; {seeds_text}). "
        "Shares: targets on items that entered in earlier windows (unknown to the frozen model) and in this "
        "window (unknown to all). Window 1: the three are the same base model. Unknown items: zero rows (score 0); "
        "'refresh's own': the refresh's current_windows, the same model as the gate ranks it (a check: equal to refreshed).",
        ["model", "window", "targets", "share earlier windows", "share this window",
         *(f"{m} {side}" for m in ("NDCG@10", "HR@10")
           for side in ("refreshed", "frozen", "retrain", "refreshed (refresh's own)"))], quality)
        + "\n" + markdown_table(
        "Ratios per window (target: refreshed/retrain >= 0.98 at a time ratio < 0.25; refreshed/frozen > 1 where "
        "items entered). Time: the refresh that takes in the window vs the retrain through it, wall seconds.",
        ["model", "window", "NDCG@10 refreshed/retrain", "HR@10 refreshed/retrain", "NDCG@10 refreshed/frozen",
         "HR@10 refreshed/frozen", "time refresh/retrain", "FLOPs refresh/retrain", "refresh s", "retrain s",
         "gate"], ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["hstu", "sasrec"], choices=["hstu", "sasrec"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=3, help="windows after the base period")
    parser.add_argument("--base-share", type=float, default=0.6, help="the base period's share of the world's time")
    parser.add_argument("--quick", action="store_true", help="a tiny world (800 users, 600 items, 60 days, 4 "
                        "epochs) and the first seed only: a check that it runs end to end")
    parser.add_argument("--config", default=str(PRESET))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value on the config")
    parser.add_argument("--out", default=None, help="default outputs/bench-refresh/<world>/refresh_rounds.md")
    args = parser.parse_args()
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    seeds = args.seeds[:1] if args.quick else args.seeds
    preset = load_config(args.config, overrides)
    if preset.refresh is None:
        raise SystemExit(f"{args.config}: no refresh section")
    spec = json.dumps([preset.data.source.model_dump(mode="json"), args.rounds, args.base_share], sort_keys=True)
    world_name = f"{'quick' if args.quick else 'world'}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
    world_dir = REPO / "outputs" / "bench-refresh" / world_name
    # a local cluster never drains nodes: Train's preemption watcher would be one more process per run on 2 CPUs
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    init_ray(preset.ray)
    started = time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    world = write_world(preset, world_dir, args.rounds, args.base_share)
    print(f"world {world_name}: files {dict(zip(world['files'], world['rows']))}, "
          f"{world['left_out_after_duration']:,} events after the world's duration left out", flush=True)
    say = lambda line: print(f"[bench] {line}", flush=True)  # noqa: E731
    cells = (({"model": model, "seed": seed},
              functools.partial(run_rounds, Path(args.config), overrides, world_dir, world, model, seed, say))
             for seed in seeds for model in args.models)
    out = Path(args.out) if args.out else world_dir / "refresh_rounds.md"
    rows = run_grid(out, cells, table)
    print()
    print(table(rows))
    print(f"machine: {machine()}; wall {time.perf_counter() - started:.0f} s; table in {out}")


if __name__ == "__main__":
    sys.exit(main())
