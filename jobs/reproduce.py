"""Recipe: the paper's MovieLens table on our data: several models x seeds, mean and spread.

    python jobs/reproduce.py --config configs/ml-1m/sasrec.yaml configs/ml-1m/hstu.yaml --seeds 1 2 3

The first config is the baseline the gain column compares with. --fixed-epoch E
(default 30) also ranks the test split after epoch E, for a column beside codes
that report a fixed number of epochs.

Each (config, seed) is one training run (early stopping on validation NDCG@10; test
reported at the best validation epoch), tracked and registered in MLflow. Runs go
seed by seed (every model's seed 1 first). The table is rewritten after every run
(--out, plus the raw rows as .json); re-running skips finished runs and resumes an
interrupted one from its checkpoint.
"""

import argparse
import json
import os
import platform
import statistics

from genrec.config import load_config, resolve_path
from genrec.runtime import init_ray
from genrec.train.trainer import fit

COLUMNS = ["hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@200", "mrr"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="outputs/results/reproduce.md")
    parser.add_argument("--fixed-epoch", type=int, default=30)
    args = parser.parse_args()
    out = resolve_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    for seed in args.seeds:
        for path in args.config:
            cfg = load_config(path, [*args.overrides, f"train.seed={seed}", f"eval.test_epochs=[{args.fixed_epoch}]"])
            if any(r["model"] == cfg.name and r["seed"] == seed for r in rows):
                continue
            cfg.train.run_name = f"{cfg.name}-seed{seed}"
            init_ray(cfg.ray)
            result = fit(cfg)
            history = result["history"]
            fixed = next((h for h in history if h["epoch"] == args.fixed_epoch and "test/ndcg@10" in h), {})
            rows.append({"model": cfg.name, "seed": seed, "epochs": result["epochs_run"],
                         "train_s_per_epoch": statistics.median(h["train/epoch_seconds"] for h in history),
                         "valid_eval_s": statistics.median(h["valid_seconds"] for h in history if "valid_seconds" in h),
                         "fixed_epoch": args.fixed_epoch,
                         **{f"fixed/{k}": fixed[f"test/{k}"] for k in ("ndcg@10", "hr@10") if fixed},
                         "wall_s": sum(h["train/epoch_seconds"] + h["eval_seconds"] for h in history), **result["best"]})
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
            out.write_text(table(rows))
    print(table(rows))


def table(rows: list) -> str:
    """Mean ± std over seeds per model; the gain is in mean test NDCG@10 over the first model."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    fixed_epoch = rows[0].get("fixed_epoch", 30) if rows else 30
    lines = [f"machine: {cpu}, {os.cpu_count()} CPUs; test metrics at the best validation NDCG@10 epoch; "
             "mean ± std over seeds", "",
             "| model | seeds | " + " | ".join(f"test {c}" for c in COLUMNS)
             + f" | NDCG@10 vs {rows[0]['model'] if rows else '-'} | test NDCG@10 / HR@10 at epoch {fixed_epoch}"
             " | best epoch | epochs run | median s/epoch train | median s one evaluation | wall min/run |",
             "|---|---:|" + "---:|" * (len(COLUMNS) + 7)]
    baseline = None
    for model in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == model]

        def cell(key, digits=4):
            values = [r[key] for r in runs if key in r]
            if not values:
                return "-"
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.{digits}f}{spread}"

        ndcg = statistics.mean(r["test/ndcg@10"] for r in runs)
        baseline = baseline or ndcg
        lines.append(f"| {model} | {len(runs)} | " + " | ".join(cell(f"test/{c}") for c in COLUMNS)
                     + f" | {100 * (ndcg / baseline - 1):+.1f}% | {cell('fixed/ndcg@10')} / {cell('fixed/hr@10')}"
                     f" | {cell('best_epoch', 0)} | {cell('epochs', 0)} | {cell('train_s_per_epoch', 1)}"
                     f" | {cell('valid_eval_s', 1)} | {statistics.mean(r['wall_s'] for r in runs) / 60:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
