"""Benchmark: the recipe ablation of issue 30: each candidate change to the paper's recipe alone, then combined.

    python jobs/prepare.py --config configs/ml-1m/data.yaml
    python benchmarks/recipe_ablation.py --config configs/ml-1m/paper-hstu.yaml --seeds 1 2 3
    python benchmarks/recipe_ablation.py --config configs/ml-1m/paper-hstu.yaml --seeds 1 2 3 \\
        --variants paper negatives-512 temperature-0.1                 # a few of the variants below
    python benchmarks/recipe_ablation.py --config configs/ml-1m/paper-hstu.yaml --seeds 1 2 3 \\
        --variant "combined train.num_negatives=512 train.temperature=0.1"   # and one of your own
    python benchmarks/recipe_ablation.py --config configs/ml-1m/paper-hstu.yaml --seeds 1 \\
        --set train.epochs=30 --set eval.every=3 --out outputs/results/recipe_ablation_30.md
        # a 30-epoch budget (the README's screen): every run stops at epoch 30, a schedule decays by then

A variant is the base config (--config, the paper's recipe: configs/ml-1m/paper-hstu.yaml, or a synthetic
world, whose oracle is the known optimum) plus `--set`-style overrides; every variant x seed is one training
run of jobs/reproduce.py's `train` (tracked and registered in MLflow as <config name>-<variant>), which ranks
the test split after --fixed-epoch (default 30) whatever validation says, and at the best validation epoch.
The grid goes seed by seed (every variant's seed 1 first) through genrec.reports.run_grid: the table (--out,
the raw rows beside it as .json) is rewritten after every run, and a re-run skips finished runs and resumes
an interrupted one from its checkpoint. Each run's folder is <config name>-<variant>-<hash of its overrides,
--set included>-seed<s>, so a variant re-defined under the same name never resumes another recipe's run;
a table whose .json holds a variant run with other overrides is refused (choose another --out).

The table: per variant, test NDCG@10 and HR@10 after epoch E and at the best validation epoch (mean ± std
over seeds), each relative to the variant "paper" (the mean over seeds, and per seed: the lowest and highest
change against paper's run with the same seed), the median training seconds per epoch and training FLOPs per
epoch (genrec.train.flops, the batches the run saw) relative to paper's; on a synthetic world also the share
of the oracle's NDCG@10. Issue 30's target is +10% NDCG@10 at epoch 30 over the paper's recipe. The variants
(VARIANTS; the shapes are solved per data set, see equal_flops_overrides):

    paper                    the base config as it is
    negatives-512            train.num_negatives 128 -> 512 (uniform)
    in-batch-negatives       the batch's other targets as negatives (popularity-sampled; no log-Q correction)
    in-batch-logq            the same with the log-Q correction (each negative's logit - log of its expected
                             count among a position's negatives, from the training targets' item shares)
    mixed-negatives-logq     128 uniform plus 128 in-batch negatives per position, log-Q corrected
    lr-0.002, lr-0.004       AdamW learning rate 0.001 -> 0.002 / 0.004 (constant)
    weight-decay-0.1         AdamW weight decay 0 -> 0.1 (decoupled: per step the weights shrink by lr x 0.1)
    temperature-0.1          softmax temperature 0.05 -> 0.1
    temperature-0.025        softmax temperature 0.05 -> 0.025
    dropout-0.1, dropout-0.3 model.dropout 0.2 -> 0.1 / 0.3
    stochastic-length-1.8    batching.stochastic_length_alpha 1.8 (paper Sec. 3.3; with N = 200 a user with
                             n > 117 inputs is cut to 117 with probability 1 - 200^1.8 / n^2)
    warmup-cosine            train.lr_schedule: 100 steps of linear warmup (about 4 epochs of ML-1M's users
                             1-2999 in batches of 128), then a cosine decay to 0.1 x lr at the last step of
                             train.epochs (after epoch 30 of 100 the lr is still about 0.85 x lr; with
                             --set train.epochs=30 it has decayed by epoch 30)
    warmup-only              the same warmup, then constant: the warmup's share of warmup-cosine's change
    deeper-equal-flops       twice the blocks, the width at which training costs the base's FLOPs per epoch
    wider-equal-flops        half the blocks (at least 1), the width at equal FLOPs
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))  # jobs/reproduce.py: the run and its row

import reproduce  # noqa: E402

from genrec.config import ConfigError, load_config, resolve_path  # noqa: E402
from genrec.data.prepared import read_split  # noqa: E402
from genrec.reports import change, groups, machine, markdown_table, mean_of, mean_std, run_grid  # noqa: E402
from genrec.train.flops import FlopModel  # noqa: E402
from genrec.train.loop import train_split_name  # noqa: E402

BASELINE = "paper"
TARGET_GAIN = 0.10  # issue 30: +10% NDCG@10 at epoch 30 over the paper's recipe

VARIANTS: dict[str, list[str]] = {
    BASELINE: [],
    "negatives-512": ["train.num_negatives=512"],
    "mixed-negatives-logq": ["train.negatives=mixed", "train.log_q_correction=true"],
    "lr-0.002": ["train.lr=0.002"],
    "lr-0.004": ["train.lr=0.004"],
    "in-batch-negatives": ["train.negatives=in_batch"],
    "in-batch-logq": ["train.negatives=in_batch", "train.log_q_correction=true"],
    "weight-decay-0.1": ["train.weight_decay=0.1"],
    "temperature-0.1": ["train.temperature=0.1"],
    "temperature-0.025": ["train.temperature=0.025"],
    "dropout-0.1": ["model.dropout=0.1"],
    "dropout-0.3": ["model.dropout=0.3"],
    "stochastic-length-1.8": ["batching.stochastic_length_alpha=1.8"],
    "warmup-cosine": ["train.lr_schedule.kind=warmup_cosine", "train.lr_schedule.warmup_steps=100",
                      "train.lr_schedule.final_lr_fraction=0.1"],
    "warmup-only": ["train.lr_schedule.kind=warmup_linear", "train.lr_schedule.warmup_steps=100",
                    "train.lr_schedule.final_lr_fraction=1.0"],
}
# shape variants: the number of blocks from the base's; the width is solved at equal training FLOPs
SHAPES = {"deeper-equal-flops": lambda blocks: 2 * blocks, "wider-equal-flops": lambda blocks: max(1, blocks // 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ml-1m/paper-hstu.yaml", help="the paper's recipe (base)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, *SHAPES], default=[*VARIANTS, *SHAPES],
                        help="which of the named variants run (default all)")
    parser.add_argument("--variant", dest="extra", action="append", default=[], metavar='"NAME KEY=VALUE ..."',
                        help="one more variant: a name, then its overrides (e.g. the combined recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="for every variant")
    parser.add_argument("--out", default="outputs/results/recipe_ablation.md")
    parser.add_argument("--fixed-epoch", type=int, default=30)
    args = parser.parse_args()
    try:
        variants = chosen_variants(args)
        out = resolve_path(args.out)
        check_saved_rows(out.with_suffix(".json"), variants, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    for name, overrides in variants.items():
        print(f"[ablation] {name}: {' '.join(overrides) or '(the base config)'}")
    rows = run_grid(out, cells(args, variants), table)
    print(table(rows))


def chosen_variants(args) -> dict[str, list[str]]:
    """The variants asked for, in the order of VARIANTS + SHAPES, then the --variant ones; shapes solved."""
    variants = {name: VARIANTS[name] for name in VARIANTS if name in args.variants}
    shapes = [name for name in SHAPES if name in args.variants]
    if shapes:
        base = load_config(args.config, args.overrides)
        for name in shapes:
            variants[name] = equal_flops_overrides(base, SHAPES[name](base.model.num_blocks))
    for text in args.extra:
        name, *overrides = shlex.split(text)
        if name in variants or name in VARIANTS or name in SHAPES or not overrides:
            raise ConfigError(f"--variant {text!r}: give a name of its own (not one of the named variants), "
                              "then at least one KEY=VALUE")
        try:  # a bad key fails now, not after hours of runs
            load_config(args.config, [*args.overrides, *overrides])
        except ConfigError as err:
            raise ConfigError(f"--variant {name}: {err}") from None
        variants[name] = overrides
    return variants


def equal_flops_overrides(cfg, num_blocks: int) -> list[str]:
    """The overrides for `num_blocks` blocks at the width (model.dim; the head widths and FFN width the
    config sets scale with it) whose training FLOPs per epoch on the prepared train split are closest to
    the base config's: genrec.train.flops.FlopModel over every training user's real input length (the
    same count as the runs' train/flops column, without Stochastic Length)."""
    items = read_split(cfg.data.output_dir, train_split_name(cfg))["items"]
    lengths = np.minimum(pc.list_value_length(items).to_numpy() - 1, cfg.kept_items)  # inputs predict the next
    lengths = lengths[lengths > 0]

    def cost(trial) -> float:
        return FlopModel.from_config(trial).training(lengths, int(lengths.sum()))

    base_cost, m = cost(cfg), cfg.model
    best = None
    for dim in range(m.num_heads, 8 * m.dim + 1, m.num_heads):  # every head gets dim / num_heads
        overrides = [f"model.num_blocks={num_blocks}", f"model.dim={dim}"]
        overrides += [f"model.{key}={max(1, round(getattr(m, key) * dim / m.dim))}"
                      for key in ("qk_dim", "v_dim", "ffn_dim") if getattr(m, key) is not None]
        trial = cfg.model_copy(deep=True)
        for text in overrides:
            key, value = text.removeprefix("model.").split("=")
            setattr(trial.model, key, int(value))
        gap = abs(cost(trial) / base_cost - 1)
        if best is None or gap < best[0]:
            best = (gap, overrides)
    return best[1]


def run_name(cfg_name: str, seed: int, overrides: list[str]) -> str:
    digest = hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:6]
    return f"{cfg_name}-{digest}-seed{seed}"


def cells(args, variants: dict[str, list[str]]):
    """The grid, seed by seed (every variant's seed 1 first): (key, run) per (variant, seed)."""
    for seed in args.seeds:
        for name, overrides in variants.items():
            recipe = [*args.overrides, *overrides]
            cfg = load_config(args.config, [*recipe, f"train.seed={seed}"])
            cfg.name = f"{cfg.name}-{name}"
            yield {"variant": name, "seed": seed}, functools.partial(
                run, cfg, args.fixed_epoch, run_name(cfg.name, seed, recipe), overrides, args.overrides)


def run(cfg, fixed_epoch: int, name: str, overrides: list[str], common: list[str]) -> dict:
    return {"overrides": overrides, "common_overrides": common, **reproduce.train(cfg, fixed_epoch, name)}


def check_saved_rows(saved: Path, variants: dict[str, list[str]], common: list[str]) -> None:
    """A table's rows must all be of the recipes this invocation means by their names."""
    if not saved.exists():
        return
    for row in json.loads(saved.read_text()):
        wanted = variants.get(row["variant"])
        if wanted is None or (row["overrides"], row["common_overrides"]) == (wanted, common):
            continue
        then, now = [*row["common_overrides"], *row["overrides"]], [*common, *wanted]
        differences = [f"{label} {' '.join(only)}" for label, a, b in (("it had", then, now), ("now", now, then))
                       if (only := [o for o in a if o not in b])] or ["the same ones in another order"]
        raise ConfigError(f"{saved}: variant {row['variant']!r} (seed {row['seed']}) ran with other overrides "
                          f"({'; '.join(differences)}): use another --out, or another variant name")


def per_seed_change(runs: list[dict], baseline: list[dict], key: str) -> str:
    """The lowest and highest change of `key` against the baseline's run with the same seed."""
    theirs = {row["seed"]: row[key] for row in baseline if key in row}
    changes = [row[key] / theirs[row["seed"]] - 1 for row in runs if key in row and row["seed"] in theirs]
    if not changes:
        return "-"
    low, high = min(changes), max(changes)
    return f"{100 * low:+.1f}%" if len(changes) == 1 else f"{100 * low:+.1f}% … {100 * high:+.1f}%"


def relative(runs: list[dict], baseline: list[dict], key: str) -> str:
    mine, theirs = [r for r in runs if key in r], [r for r in baseline if key in r]
    return change(mean_of(mine, key), mean_of(theirs, key)) if mine and theirs else "-"


def table(rows: list[dict]) -> str:
    """One line per variant: mean ± std over seeds, each against the baseline variant."""
    by_variant = groups(rows, "variant")
    base_name = BASELINE if BASELINE in by_variant else next(iter(by_variant), "-")
    baseline = by_variant.get(base_name, [])
    epoch = rows[0]["fixed_epoch"] if rows else 30
    oracle = next((row["oracle/ndcg@10"] for row in rows if "oracle/ndcg@10" in row), None)
    columns = ["variant", "overrides", "seeds", f"NDCG@10 at epoch {epoch}", f"HR@10 at epoch {epoch}",
               f"NDCG@10 at epoch {epoch} vs {base_name}", f"per seed vs {base_name}",
               *([f"NDCG@10 at epoch {epoch} / oracle"] if oracle else []),
               "NDCG@10 at best valid", "HR@10 at best valid", f"best-valid NDCG@10 vs {base_name}", "best epoch",
               "epochs run", "median s/epoch train", f"s/epoch vs {base_name}", f"FLOPs/epoch vs {base_name}"]
    lines = []
    for variant, runs in by_variant.items():
        at_epoch = sum("fixed/ndcg@10" in r for r in runs)
        seeds = str(len(runs)) if at_epoch == len(runs) else f"{len(runs)} ({at_epoch} reached epoch {epoch})"
        lines.append([variant, " ".join(runs[0]["overrides"]) or "-", seeds,
                      mean_std(runs, "fixed/ndcg@10"), mean_std(runs, "fixed/hr@10"),
                      relative(runs, baseline, "fixed/ndcg@10"), per_seed_change(runs, baseline, "fixed/ndcg@10"),
                      *([f"{mean_of(runs, 'fixed/ndcg@10') / oracle:.1%}" if at_epoch else "-"] if oracle else []),
                      mean_std(runs, "test/ndcg@10"), mean_std(runs, "test/hr@10"),
                      relative(runs, baseline, "test/ndcg@10"), mean_std(runs, "best_epoch", 0),
                      mean_std(runs, "epochs", 0), mean_std(runs, "train_s_per_epoch", 1),
                      relative(runs, baseline, "train_s_per_epoch"), relative(runs, baseline, "train_flops_per_epoch")])
    common = rows[0]["common_overrides"] if rows else []
    world = f"; the oracle's test NDCG@10 {oracle:.4f}" if oracle else ""
    return markdown_table(
        f"machine: {machine()}; every variant = the base config{' with --set ' + ' '.join(common) if common else ''} "
        f"plus its overrides; test metrics after epoch {epoch} and at the best validation NDCG@10 epoch, mean ± std "
        f"over seeds; issue 30's target: {change(1 + TARGET_GAIN, 1)} NDCG@10 at epoch 30 over {base_name}{world}",
        columns, lines)


if __name__ == "__main__":
    main()
