"""Recipe: the paper's MovieLens table on our data: several models x seeds, mean and spread.

    python jobs/reproduce.py --config configs/ml-1m/sasrec.yaml configs/ml-1m/hstu.yaml --seeds 1 2 3

Each (config, seed) is one training run (early stopping on validation NDCG@10; test
reported at the best validation epoch), tracked and registered in MLflow. Runs go
seed by seed (every model's seed 1 first). The table is rewritten after every run
(--out, plus the raw rows as .json); re-running skips finished runs and resumes an
interrupted one from its checkpoint.
"""

import argparse
import json
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
    args = parser.parse_args()
    out = resolve_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    for seed in args.seeds:
        for path in args.config:
            cfg = load_config(path, [*args.overrides, f"train.seed={seed}"])
            if any(r["model"] == cfg.name and r["seed"] == seed for r in rows):
                continue
            cfg.train.run_name = f"{cfg.name}-seed{seed}"
            init_ray(cfg.ray)
            result = fit(cfg)
            history = result["history"]
            rows.append({"model": cfg.name, "seed": seed, "epochs": result["epochs_run"],
                         "train_s_per_epoch": statistics.median(h["train/epoch_seconds"] for h in history),
                         "eval_s_per_epoch": statistics.median(h["eval_seconds"] for h in history),
                         "wall_s": sum(h["train/epoch_seconds"] + h["eval_seconds"] for h in history), **result["best"]})
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
            out.write_text(table(rows))
    print(table(rows))


def table(rows: list) -> str:
    lines = [f"machine: {platform.machine()}, {__import__('os').cpu_count()} CPUs; test metrics at the best validation "
             "NDCG@10 epoch; mean ± std over seeds", "",
             "| model | seeds | " + " | ".join(f"test {c}" for c in COLUMNS)
             + " | best epoch | epochs run | median s/epoch train | median s/epoch eval | wall min/run |",
             "|---|---:|" + "---:|" * (len(COLUMNS) + 5)]
    for model in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == model]

        def cell(key, digits=4):
            values = [r[key] for r in runs]
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.{digits}f}{spread}"

        lines.append(f"| {model} | {len(runs)} | " + " | ".join(cell(f"test/{c}") for c in COLUMNS)
                     + f" | {cell('best_epoch', 0)} | {cell('epochs', 0)} | {cell('train_s_per_epoch', 1)}"
                     f" | {cell('eval_s_per_epoch', 1)} | {statistics.mean(r['wall_s'] for r in runs) / 60:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
