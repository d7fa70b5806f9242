"""Generative ranking in the training loop (model.kind gr, and the dlrm baseline).

Batches are the interleaved layout (genrec.data.batches). One step's loss is

    ranking loss (the tasks' heads at item positions: BCE / MSE, weighted)
      + ranking.retrieval_weight x retrieval loss (sampled softmax at action positions; gr only)

each half a sum over this worker's positions divided by the global count over
workers (times the world size, as the retrieval loop does), so 1 and 2 workers
train the same model. With ranking.training "pointwise", each example is one
history + candidate (the sequence cut at a sampled impression) and only that
candidate's ranking loss counts: the ablation that isolates generative training.

Everything that depends on the data (an unknown action, a rating task on data
without ratings, an interleaved layout on data without actions) is checked by
`check_ranking_data` on the driver, before any worker starts.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch

from ..artifact import is_ranking
from ..config import ConfigError, ExperimentConfig
from ..data.layout import ITEM, NO_ACTION
from ..data.prepared import read_manifest, read_split
from ..metrics import binary_metrics, metrics_from_ranks, regression_metrics
from ..model.jagged import concat_ranges, positions_in_sequence
from ..model.ranking_losses import multitask_loss
from .evaluation import TiePolicy, full_ranks

SELECTION_METRIC = "valid/ne_gain"  # 1 - mean NE over the binary tasks: higher is better


# ----------------------------------------------------------------------------- checks

def check_ranking_data(cfg: ExperimentConfig) -> None:
    """Driver side: the config against the prepared data, one error naming the key."""
    if cfg.batching.layout != "interleaved":
        return
    manifest = read_manifest(cfg.data.output_dir)
    actions = manifest.get("actions") or []
    if len(actions) < 2:
        raise ConfigError(f"batching.layout='interleaved': the data at {cfg.data.output_dir} was prepared without "
                          f"an action vocabulary (actions {actions}), so action tokens would carry nothing; "
                          "use layout 'items', or prepare the data with its actions (data.source ... actions)")
    rating_tasks = []
    for i, task in enumerate(cfg.ranking.tasks):
        if task.action is not None and task.action not in actions:
            raise ConfigError(f"ranking.tasks[{i}].action={task.action!r} (task {task.name!r}) is not an action of "
                              f"the data at {cfg.data.output_dir}; its actions are {actions}")
        if task.kind == "regression" or task.rating_at_least is not None:
            rating_tasks.append(i)
    if rating_tasks:
        values = read_split(cfg.data.output_dir, "train")["values"].combine_chunks().values.to_numpy()
        if not np.isfinite(values).any():
            i = rating_tasks[0]
            raise ConfigError(f"ranking.tasks[{i}] (task {cfg.ranking.tasks[i].name!r}) needs ratings, but the data "
                              f"at {cfg.data.output_dir} has no event values")


class TaskLabels:
    """Per-task labels [P, tasks] of ranked impressions from their actions and values (NaN = no label)."""

    def __init__(self, cfg: ExperimentConfig, manifest: dict) -> None:
        names = manifest["actions"]
        self.bitmask = manifest.get("action_encoding") == "bitmask"
        self.tasks = [(names.index(t.action) if t.action else None, t.rating_at_least) for t in cfg.ranking.tasks]

    def __call__(self, actions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        columns = []
        for action, at_least in self.tasks:
            if action is not None:
                hit = ((actions >> action) & 1) == 1 if self.bitmask else actions == action
                columns.append(hit.float())
            elif at_least is not None:
                columns.append(torch.where(torch.isnan(values), values, (values >= at_least).float()))
            else:
                columns.append(values.float())
        return torch.stack(columns, 1)


def check_selection_tasks(cfg: ExperimentConfig) -> list[str]:
    """Driver side, before training: the model is selected on the NE of the binary tasks over the
    validation targets, and a task with one class among them has no NE (nor AUC). Returns a warning
    naming each such task (it is left out of selection); refuses when no binary task has both classes,
    naming every task and its counts, since no model could ever be selected."""
    if not is_ranking(cfg) or cfg.train.train_on != "train" or cfg.train.mode != "epochs":
        return []
    valid = read_split(cfg.data.output_dir, "valid")
    lengths = np.diff(valid["items"].combine_chunks().offsets.to_numpy()) if valid.num_rows else np.zeros(0, np.int64)
    index = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # position in its user's list
    target = index >= np.repeat(np.maximum(valid["eval_start"].to_numpy(), 1), lengths)
    actions, values = (valid[name].combine_chunks().flatten().to_numpy()[target] for name in ("actions", "values"))
    labels = TaskLabels(cfg, read_manifest(cfg.data.output_dir))(torch.from_numpy(actions.astype(np.int64)),
                                                                 torch.from_numpy(values.astype(np.float32))).numpy()
    counts, measurable = {}, []
    for i, task in enumerate(cfg.ranking.tasks):
        if task.kind == "binary":
            y = labels[~np.isnan(labels[:, i]), i]
            counts[task.name] = (int((y == 1).sum()), len(y))
            if 0 < counts[task.name][0] < len(y):
                measurable.append(task.name)
    where = f"the {int(target.sum()):,} validation targets of {cfg.data.output_dir}"
    if not measurable:
        named = "; ".join(f"task {name!r}: {pos:,} positives of {n:,} labelled" for name, (pos, n) in counts.items())
        raise ConfigError(f"ranking.tasks: no binary task has both positives and negatives among {where} ({named}), "
                          "so no NE could select a model; use a task with both there, or a split with more "
                          "validation users (data.split)")
    return [f"task {name!r} has {pos:,} positives of {n:,} labelled among {where}: it has no NE or AUC there, so "
            f"it is left out of model selection (valid/ne_gain is over {', '.join(map(repr, measurable))})"
            for name, (pos, n) in counts.items() if name not in measurable]


# ----------------------------------------------------------------------------- training

def pointwise_examples(batch: dict, per_user: int, seed: int, epoch: int) -> dict:
    """The pointwise ablation's batch: `per_user` examples per user, each the user's tokens up to one
    sampled ranked impression (its candidate, the last token); that candidate is the only target.
    Cuts are drawn per (seed, epoch, user), so they do not depend on how users are split over workers."""
    offsets, actions = batch["offsets"], batch["target_actions"]
    ranked = torch.nonzero(actions != NO_ACTION).squeeze(1)
    owner = torch.searchsorted(offsets, ranked, right=True) - 1
    counts = torch.bincount(owner, minlength=offsets.numel() - 1)
    users = batch["users"][counts > 0]
    first = (torch.cumsum(counts, 0) - counts)[counts > 0]
    draws = torch.from_numpy(np.stack([np.random.default_rng([seed, epoch, int(u)]).random(per_user) for u in users])
                             if len(users) else np.zeros((0, per_user)))
    pick = first.unsqueeze(1) + (draws * counts[counts > 0].unsqueeze(1)).long()  # [U, per_user]
    cut = ranked[pick.flatten()]
    start = offsets[owner[pick.flatten()]]
    lengths = cut - start + 1
    index = concat_ranges(start, lengths)
    out = {k: v[index] for k, v in batch.items() if k not in ("offsets", "users")}
    new_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    last = new_offsets[1:] - 1
    out["target_actions"] = torch.full_like(out["target_actions"], NO_ACTION).index_copy(0, last, actions[cut])
    out["target_ids"] = torch.zeros_like(out["target_ids"])
    out["offsets"], out["users"] = new_offsets, users.repeat_interleave(per_user)
    return out


class RankingStep:
    """Loss of one batch and the epoch's sums of its parts (what the loop logs besides train/loss)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        manifest = read_manifest(cfg.data.output_dir)
        self.cfg, self.labels = cfg, TaskLabels(cfg, manifest)
        self.weights = torch.tensor([t.weight for t in cfg.ranking.tasks])
        self.binary = torch.tensor([t.kind == "binary" for t in cfg.ranking.tasks])
        self.names = [t.name for t in cfg.ranking.tasks]
        self.sums = torch.zeros(3 + len(self.names), dtype=torch.float64)  # ranking, retrieval, impressions, tasks

    def __call__(self, w, batch: dict, negatives: torch.Tensor, epoch: int) -> torch.Tensor:
        cfg, r = self.cfg, self.cfg.ranking
        pointwise = r.training == "pointwise"
        if pointwise:
            batch = pointwise_examples(batch, r.pointwise_examples_per_user, cfg.train.seed, epoch)
        users, logits = w.model(batch["item_ids"], batch["token_types"], batch["timestamps"],
                                batch["target_timestamps"], batch["offsets"])
        ranked = batch["target_actions"] != NO_ACTION
        has_target = batch["target_ids"] > 0
        counts = w.all_reduce(torch.stack([ranked.sum(), has_target.sum()]).float().to(w.device))
        labels = self.labels(batch["target_actions"][ranked], batch["target_values"][ranked])
        rank_loss, per_task = multitask_loss(logits[ranked], labels, self.binary.to(w.device),
                                             self.weights.to(w.device), counts[0].clamp(min=1) / w.world)
        loss, retrieval = rank_loss, torch.zeros(())
        if users is not None and not pointwise and r.retrieval_weight > 0:
            retrieval = w.retrieval_loss(users, batch["target_ids"], negatives, counts[1].clamp(min=1) / w.world)
            loss = loss + r.retrieval_weight * retrieval
        self.sums += torch.cat([torch.stack([rank_loss.detach(), retrieval.detach()]).double().cpu() / w.world,
                                ranked.sum().double().view(1).cpu(), per_task.double().cpu() / w.world])
        return loss

    def epoch_metrics(self, w, steps: int, seconds: float) -> dict:
        """The epoch's halves of the loss and impressions/s, over all workers; resets the sums."""
        sums, self.sums = w.all_reduce(self.sums.to(w.device)).cpu(), torch.zeros_like(self.sums)
        out = {"train/ranking_loss": float(sums[0]) / max(steps, 1), "train/retrieval_loss": float(sums[1]) / max(steps, 1),
               "train/impressions_per_s": float(sums[2]) / seconds}
        out.update({f"train/{name}_loss": float(v) / max(steps, 1) for name, v in zip(self.names, sums[3:])})
        return out


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_ranking(model, batches, labels: TaskLabels, task_kinds: list, task_names: list,
                     ties: TiePolicy = "pessimistic") -> dict[str, float]:
    """Per task AUC / NE / log loss / calibration (MSE / MAE for regression) at every ranked impression
    of `batches` (leave-one-out: each user's held-out item; a time split: every event after the cutoff,
    each from its user's most recent events before it: genrec.train.batching.evaluation_batches), and
    for gr the retrieval metrics of the same model at the action positions that predict those items.
    ne_gain = 1 - mean NE of the binary tasks that have an NE here (both classes among the targets;
    fit names the others before training); count = the ranked impressions."""
    was_training = model.training
    model.eval()
    items = model.all_item_embeddings() if model.retrieval else None
    predictions, targets, ranks = [], [], []
    for batch in batches:
        ranked = batch["target_actions"] != NO_ACTION
        users, logits = model(batch["item_ids"], batch["token_types"], batch["timestamps"],
                              batch["target_timestamps"], batch["offsets"], scored=ranked)
        predictions.append(model.predictions(logits[ranked]))
        targets.append(labels(batch["target_actions"][ranked], batch["target_values"][ranked]))
        position = torch.nonzero(batch["target_ids"] > 0).squeeze(1)
        if items is not None and len(position):
            # the items seen before each target: the item tokens of its user up to it
            seen = positions_in_sequence(batch["offsets"], len(batch["item_ids"]))[position] + 1
            tokens = concat_ranges(position + 1 - seen, seen)
            rows = torch.arange(len(position), device=position.device).repeat_interleave(seen)
            is_item = batch["token_types"][tokens] == ITEM
            ranks.append(full_ranks(users[position], batch["target_ids"][position], items,
                                    batch["item_ids"][tokens][is_item], rows[is_item], ties=ties))
    model.train(was_training)
    if not predictions or not sum(len(p) for p in predictions):
        raise ValueError("no ranked impressions in the split")
    predictions, targets = torch.cat(predictions).double().numpy(), torch.cat(targets).double().numpy()
    out, nes = {}, []
    for t, (name, kind) in enumerate(zip(task_names, task_kinds)):
        known = ~np.isnan(targets[:, t])
        y, p = targets[known, t], predictions[known, t]
        metrics = binary_metrics(y, p) if kind == "binary" else regression_metrics(y, p)
        out.update({f"{name}/{k}": v for k, v in metrics.items()})
        if kind == "binary" and math.isfinite(metrics["ne"]):  # one class among the targets: no NE
            nes.append(metrics["ne"])
    out["ne_gain"] = 1.0 - float(np.mean(nes)) if nes else math.nan
    out["count"] = float(len(predictions))
    if ranks:
        out.update(metrics_from_ranks(torch.cat(ranks).cpu()))
    return out


def ranking_evaluator(cfg: ExperimentConfig):
    """evaluate(model, batches, ties=...) for this experiment's tasks (the loop's evaluation hook)."""
    tasks = cfg.ranking.tasks
    return partial(evaluate_ranking, labels=TaskLabels(cfg, read_manifest(cfg.data.output_dir)),
                   task_kinds=[t.kind for t in tasks], task_names=[t.name for t in tasks])
