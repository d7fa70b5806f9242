"""Recipe: generative ranking vs a DLRM-style ranker vs GR trained pointwise, same data, splits and seeds.

    python jobs/rank_compare.py --config configs/synthetic/multi-action.yaml --seeds 1 2 3
    python jobs/rank_compare.py --config configs/ml-1m/gr.yaml --seeds 1 2 3 --set train.epochs=10

From one GR config (model.kind gr) three models are trained, each a tracked and registered run:
  gr            the config as is: every impression of a sequence in one causal pass, ranking + retrieval
  dlrm          model.kind dlrm: DIN attention over the aged history + the target's time gaps + context + MLP, pointwise
  gr-pointwise  ranking.training pointwise: the same HSTU, one (history, candidate) example at a time,
                ranking loss only (what generative training buys, isolated)
Each is selected on validation 1 - mean NE and reported on the leave-one-out test targets: per task
AUC and NE (mean ± std over seeds), training impressions/s, and on a synthetic world the oracle NE/AUC
of the generator's true action probabilities on the same targets. The table is rewritten after every
run (--out, raw rows in .json); re-running skips finished runs and resumes an interrupted one.
"""

import argparse
import functools
import statistics

from genrec.config import load_config, resolve_path
from genrec.data.prepared import read_manifest
from genrec.reports import change, groups, machine, markdown_table, mean_std, run_grid
from genrec.runtime import init_ray
from genrec.train.trainer import fit

VARIANTS = {"gr": [], "dlrm": ["model.kind=dlrm"], "gr-pointwise": ["ranking.training=pointwise"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a GR config (model.kind gr)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None, help="default outputs/results/rank_compare-<config name>.md")
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    if base.model.kind != "gr":
        parser.error(f"--config {args.config}: model.kind is {base.model.kind!r}; give the GR config")
    oracle = read_manifest(base.data.output_dir).get("synthetic_oracle")
    cells = (({"variant": variant, "seed": seed}, functools.partial(train, args, variant, seed))
             for seed in args.seeds for variant in args.variants)
    rows = run_grid(resolve_path(args.out or f"outputs/results/rank_compare-{base.name}.md"), cells,
                    lambda rows: table(rows, base, oracle))
    print(table(rows, base, oracle))


def train(args, variant: str, seed: int) -> dict:
    """One (variant, seed) run, tracked and registered under the variant's name; its row of the table."""
    cfg = load_config(args.config, [*args.overrides, *VARIANTS[variant], f"train.seed={seed}"])
    cfg.train.run_name = f"{cfg.name}-{variant}-seed{seed}"
    cfg.tracking.registered_model = f"{cfg.name}-{variant}"
    init_ray(cfg.ray)
    result = fit(cfg)
    history = result["history"]
    return {"epochs": result["epochs_run"],
            "impressions_per_s": statistics.median(h["train/impressions_per_s"] for h in history),
            "train_s_per_epoch": statistics.median(h["train/epoch_seconds"] for h in history), **result["best"]}


def table(rows: list, cfg, oracle: dict | None) -> str:
    """Per task test AUC / NE per model (mean ± std over seeds), NE relative to the DLRM, speed."""
    binary = [t for t in cfg.ranking.tasks if t.kind == "binary"]
    regression = [t for t in cfg.ranking.tasks if t.kind == "regression"]
    columns = (["model", "seeds"] + [f"{t.name} {m}" for t in binary for m in ("AUC", "NE")]
               + [f"{t.name} MSE" for t in regression]
               + ["mean NE vs dlrm", "retrieval HR@10 / NDCG@10", "train impressions/s", "s/epoch", "epochs (best)"])
    split = cfg.data.split
    targets = ("leave-one-out" if split.kind == "leave_one_out" else
               f"time split: every event after the {f'{split.quantile:g} quantile' if split.quantile else split.cutoff}"
               f" cutoff, each scored from its user's most recent {cfg.model.max_seq_len} events before it")
    mean_ne = lambda runs: statistics.mean(statistics.mean(r[f"test/{t.name}/ne"] for t in binary) for r in runs)
    by_variant = groups(rows, "variant")
    dlrm = by_variant.get("dlrm")
    lines = [[variant, str(len(runs)), *(mean_std(runs, f"test/{t.name}/{m}") for t in binary for m in ("auc", "ne")),
              *(mean_std(runs, f"test/{t.name}/mse") for t in regression),
              change(mean_ne(runs), mean_ne(dlrm)) if dlrm else "-",
              f"{mean_std(runs, 'test/hr@10')} / {mean_std(runs, 'test/ndcg@10')}", mean_std(runs, "impressions_per_s", 0),
              mean_std(runs, "train_s_per_epoch", 1), f"{mean_std(runs, 'epochs', 0)} ({mean_std(runs, 'best_epoch', 0)})"]
             for variant, runs in by_variant.items()]
    actions = (oracle or {}).get("test", {}).get("actions", {})
    if actions and all(t.action in actions for t in binary):
        lines.append(["oracle (true action probabilities)", "-",
                      *(f"{actions[t.action][k]:.4f}" for t in binary for k in ("oracle_auc", "oracle_ne")),
                      *["-"] * (len(regression) + 5)])
    return markdown_table(f"machine: {machine()}; {cfg.name}: test ({targets}) targets at the epoch of best validation "
                          "1 - mean NE; mean ± std over seeds", columns, lines)


if __name__ == "__main__":
    main()
