"""Recipe: the paper's MovieLens table on our data: several models x seeds, mean and spread.

    python jobs/reproduce.py --config configs/ml-1m/sasrec.yaml configs/ml-1m/hstu.yaml --seeds 1 2 3

The first config is the baseline the gain column compares with. --fixed-epoch E
(default 30) also ranks the test split after epoch E, for a column beside codes
that report a fixed number of epochs. Configs with train.mode one_pass report their
stream metrics instead (every event ranked before the model trains on it), and a
synthetic source adds its oracle beside them.

Each (config, seed) is one training run (early stopping on validation NDCG@10; test
reported at the best validation epoch), tracked and registered in MLflow. Runs go
seed by seed (every model's seed 1 first). The table is rewritten after every run
(--out, plus the raw rows as .json); re-running skips finished runs and resumes an
interrupted one from its checkpoint.
"""

import argparse
import functools
import statistics

from genrec.config import load_config, resolve_path
from genrec.data.prepared import read_manifest
from genrec.metrics import RETRIEVAL_METRICS
from genrec.reports import change, groups, machine, markdown_table, mean_of, mean_std, run_grid
from genrec.runtime import init_ray
from genrec.train.trainer import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="outputs/results/reproduce.md")
    parser.add_argument("--fixed-epoch", type=int, default=30)
    args = parser.parse_args()
    rows = run_grid(resolve_path(args.out), cells(args), table)
    print(table(rows))


def cells(args):
    """The grid, seed by seed (every model's seed 1 first): (key, run) per (config, seed)."""
    for seed in args.seeds:
        for path in args.config:
            cfg = load_config(path, [*args.overrides, f"train.seed={seed}"])
            yield {"model": cfg.name, "seed": seed}, functools.partial(train, cfg, args.fixed_epoch)


def train(cfg, fixed_epoch: int, run_name: str | None = None) -> dict:
    """One (config, seed) run, tracked and registered (default run name: <config name>-seed<seed>); its row of
    the table."""
    one_pass = cfg.train.mode == "one_pass"
    if not one_pass:
        cfg.eval.test_epochs = [fixed_epoch]
    cfg.train.run_name = run_name or f"{cfg.name}-seed{cfg.train.seed}"
    init_ray(cfg.ray)
    result = fit(cfg)
    history = result["history"]
    fixed = next((h for h in history if h["epoch"] == fixed_epoch and "test/ndcg@10" in h), {})
    evaluations = [h["eval_seconds" if one_pass else "valid_seconds"] for h in history
                   if ("window/targets" if one_pass else "valid_seconds") in h]
    oracle = read_manifest(cfg.data.output_dir).get("synthetic_oracle")
    flops = [h["train/flops"] for h in history if "train/flops" in h]  # epochs from before FLOPs were counted lack it
    return {"epochs": result["epochs_run"],
            "train_s_per_epoch": statistics.median(h["train/epoch_seconds"] for h in history),
            **({"train_flops_per_epoch": statistics.median(flops)} if flops else {}),
            "valid_eval_s": statistics.median(evaluations), "fixed_epoch": fixed_epoch,
            **{f"oracle/{k}": v for k, v in ((oracle or {}).get("test", {}).get("oracle", {})).items()},
            **{f"fixed/{k}": fixed[f"test/{k}"] for k in ("ndcg@10", "hr@10") if fixed},
            "wall_s": sum(h["train/epoch_seconds"] + h.get("eval_seconds", 0.0) for h in history), **result["best"]}


def table(rows: list) -> str:
    """Mean ± std over seeds per model; the gain is in mean test NDCG@10 over the first model."""
    if rows and "stream/hr@10" in rows[0]:
        return stream_table(rows)
    fixed_epoch = rows[0].get("fixed_epoch", 30) if rows else 30
    columns = ["model", "seeds", *(f"test {c}" for c in RETRIEVAL_METRICS), f"NDCG@10 vs {rows[0]['model'] if rows else '-'}",
               f"test NDCG@10 / HR@10 at epoch {fixed_epoch}", "best epoch", "epochs run", "median s/epoch train",
               "median s one evaluation", "wall min/run"]
    by_model = groups(rows, "model")
    baseline = mean_of(next(iter(by_model.values())), "test/ndcg@10") if rows else None
    lines = [[model, str(len(runs)), *(mean_std(runs, f"test/{c}") for c in RETRIEVAL_METRICS),
              change(mean_of(runs, "test/ndcg@10"), baseline),
              f"{mean_std(runs, 'fixed/ndcg@10')} / {mean_std(runs, 'fixed/hr@10')}", mean_std(runs, "best_epoch", 0),
              mean_std(runs, "epochs", 0), mean_std(runs, "train_s_per_epoch", 1), mean_std(runs, "valid_eval_s", 1),
              f"{mean_of(runs, 'wall_s') / 60:.1f}"] for model, runs in by_model.items()]
    return markdown_table(f"machine: {machine()}; test metrics at the best validation NDCG@10 epoch; "
                          "mean ± std over seeds", columns, lines)


def stream_table(rows: list) -> str:
    """One-pass runs: stream metrics (windows 2..W) per model, the oracle beside them."""
    keys = ["hr@10", "hr@50", "ndcg@10"]
    columns = ["model", "seeds", *(k.upper() for k in keys), f"HR@50 vs {rows[0]['model']}",
               "oracle HR@10 / HR@50 (leave-one-out targets)", "windows", "median s/window train",
               "median s/window ranking", "wall min/run"]
    by_model = groups(rows, "model")
    baseline = mean_of(next(iter(by_model.values())), "stream/hr@50")
    lines = [[model, str(len(runs)), *(mean_std(runs, f"stream/{k}") for k in keys),
              change(mean_of(runs, "stream/hr@50"), baseline),
              f"{mean_std(runs, 'oracle/hr@10')} / {mean_std(runs, 'oracle/hr@50')}", mean_std(runs, "epochs", 0),
              mean_std(runs, "train_s_per_epoch", 1), mean_std(runs, "valid_eval_s", 1),
              f"{mean_of(runs, 'wall_s') / 60:.1f}"] for model, runs in by_model.items()]
    return markdown_table(f"machine: {machine()}; one pass, every event ranked before training on it (windows 2..W); "
                          "mean ± std over seeds", columns, lines)


if __name__ == "__main__":
    main()
