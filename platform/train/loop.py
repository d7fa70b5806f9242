"""The per-worker training loop that Ray Train runs (one copy per worker, DDP between them).

    resume -> for each epoch: train_one_epoch -> evaluate_and_select -> log -> checkpoint

train.mode one_pass walks time windows instead of epochs (streaming.py):

    resume -> for each window: evaluate it -> train on it once -> log -> checkpoint

The loss of a step is the sum over this worker's target positions divided by
the global count, times the world size (DDP averages gradients over workers),
so 1 and 2 workers train the same model; batches and seeds: see batching.py.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch
import torch.distributed as dist

from ..artifact import build_model, is_ranking
from ..config import ExperimentConfig
from ..data.batches import count_targets
from ..data.loader import BatchSpec
from ..data.prepared import SEQUENCES, read_manifest, read_split
from ..errors import GenrecError
from ..model import sampled_softmax_loss
from ..storage import Location, location
from .batching import (batch_spec, evaluation_batches, evaluation_split, negative_log_q, replicated_batches,
                       streaming_batches)
from .checkpoint import Progress, restore, save_checkpoint
from .evaluation import evaluate, whole_catalog
from .flops import FlopModel
from .ranking import RankingStep, ranking_evaluator
from .ranking import SELECTION_METRIC as RANKING_SELECTION_METRIC
from .optim import build_optimizer, set_scheduled_lr
from .sharding import (full_state_dict, item_table_names, local_catalog, optimizer_groups, scoring_items,
                       shard_item_tables)
from .streaming import StreamWindows, add_to_stream, evaluate_window

SELECTION_METRIC = "valid/ndcg@10"
PROGRESS_EVERY_S = 60  # an epoch (or window) longer than this shows a progress line this often


def selection_metric(cfg: ExperimentConfig) -> str:
    """What picks the best epoch (higher is better): retrieval NDCG@10, or for rankers 1 - mean NE."""
    return RANKING_SELECTION_METRIC if is_ranking(cfg) else SELECTION_METRIC
NON_FINITE_MARKER = "non_finite_loss.txt"  # written beside the checkpoints when a run stops on nan/inf
# Written beside the checkpoints by a sweep's scheduler (genrec.train.sweep): the run ends after the epoch
# it is in, as on early stopping, so Ray Train shuts its workers down itself (a Tune trial stopped
# from outside leaves its Train placement group behind on Ray 2.60).
STOP_REQUEST = "stop_requested.txt"


class NonFiniteLossError(GenrecError, FloatingPointError):
    """The loss became nan or inf; the message names the epoch, the step and the last good checkpoint."""


class NoModelSelectedError(GenrecError):
    """No evaluation ever selected a model (its selection metric was never a number): nothing is registered."""


@dataclass(frozen=True)
class StartingPoint:
    """Where a run without a checkpoint of its own starts (a refresh, genrec.train.refresh): the weights in
    `state`, a torch file on storage ({"model": state dict, "optimizer": state dict or None}; the optimizer's
    only for replicated tables), and in one_pass mode the time its first window starts (earlier events are
    history only: never ranked, never trained on). A run with a checkpoint resumes from it instead."""

    state: str
    window_start: int | None = None


def read_starting_state(start: StartingPoint) -> dict:
    """The state a StartingPoint names, from wherever it is stored (the run's folder: local or an object store)."""
    return torch.load(io.BytesIO(location(start.state, "train.storage_path").read_bytes()), weights_only=True)


class _Diverged(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(step, value)
        self.step, self.value = step, value


@dataclass
class Worker:
    """What one training worker holds."""

    cfg: ExperimentConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped when world > 1
    core: torch.nn.Module  # the encoder itself
    optimizer: torch.optim.Optimizer
    run_folder: Location  # the Train run's folder (local, or a prefix on an object store)
    train_spec: BatchSpec  # with Stochastic Length, if configured
    eval_spec: BatchSpec
    sharded: bool  # the item tables are split row-wise over the workers (genrec.train.sharding)
    _evaluation_model: torch.nn.Module | None = None  # rank 0, sharded: a whole copy, filled per evaluation
    _negative_log_q: torch.Tensor | None = None  # train.log_q_correction: filled at the first step

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def retrieval_loss(self, users: torch.Tensor, target_ids: torch.Tensor, negatives: torch.Tensor,
                       normalizer: torch.Tensor) -> torch.Tensor:
        """The sampled softmax of a batch: against the whole item table, or with sharded tables against
        the rows of the batch's own candidates (the same loss: genrec.train.sharding.batch_item_table)."""
        log_q = self.item_log_q()[negatives].to(self.device) if self.cfg.train.log_q_correction else None
        items, target_ids, negatives = scoring_items(self.core, self.sharded, target_ids, negatives.to(self.device))
        return sampled_softmax_loss(users, target_ids, items, negatives, temperature=self.cfg.train.temperature,
                                    normalizer=normalizer, negative_log_q=log_q)

    def item_log_q(self) -> torch.Tensor:
        """[V+1] log Q of each item as a negative (train.log_q_correction), counted once per worker from the
        training split; by item id, so it is taken before a sharded table renumbers the negatives."""
        if self._negative_log_q is None:
            self._negative_log_q = negative_log_q(self.cfg, train_split_name(self.cfg), self.train_spec.num_items)
        return self._negative_log_q

    def whole_model(self) -> torch.nn.Module | None:
        """The model with whole tables, for evaluation and the best state, on rank 0 (None elsewhere).
        Sharded, it is a collective: every rank calls it at the same points."""
        if not self.sharded:
            return self.core if self.rank == 0 else None
        state = full_state_dict(self.core, self.rank)
        if self.rank == 0:
            if self._evaluation_model is None:
                self._evaluation_model = build_model(self.cfg).to(self.device)
            self._evaluation_model.load_state_dict(state)
            self._evaluation_model.train(self.core.training)
        return self._evaluation_model


def train_loop_per_worker(loop_config: dict) -> None:
    # imported here, not with the module: Ray Train's controller imports this module to find this function,
    # and mlflow's import (1.6 s) would delay every run's start; only rank 0 logs
    from .tracking import MetricLogger

    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    start = StartingPoint(**loop_config["start"]) if loop_config.get("start") else None
    worker, progress = setup_and_resume(cfg, location(loop_config["run_folder"], "train.storage_path"), start)
    windows = StreamWindows(read_split(cfg.data.output_dir, SEQUENCES), cfg.train.window_days,
                            start.window_start if start else None) if cfg.train.mode == "one_pass" else None
    total = len(windows) if windows else cfg.train.epochs
    logger = MetricLogger(cfg, worker.run_folder, loop_config.get("mlflow_run_id"), progress.epoch + 1, total,
                          "window" if windows else "epoch") if worker.rank == 0 else None
    if logger and progress.epoch >= 0:
        logger.say(f"resumed from checkpoint after {'window' if windows else 'epoch'} {progress.epoch + 1}")
    train_table = read_split(cfg.data.output_dir, train_split_name(cfg)) \
        if cfg.train.data_mode == "replicated" and not windows else None
    splits = {s: evaluation_split(cfg.data.output_dir, s, worker.eval_spec.keep_items, cfg.eval.users)
              for s in ("valid", "test")} if worker.rank == 0 and not windows else {}
    if logger and splits:
        logger.say(evaluation_targets_line(cfg, splits, worker.eval_spec.keep_items))
    for epoch in range(progress.epoch + 1, total):
        scored = {}
        if windows:
            train_table, targets = windows.window(epoch)
            if targets and (worker.rank == 0 or worker.sharded):
                scored = score_window(worker, train_table, epoch, progress)
        try:
            say = logger.say if logger else None
            trained = train_window(worker, epoch, train_table, say) if windows else \
                train_one_epoch(worker, epoch, train_table, say)
            metrics = {**trained, **scored}
            # the run's compute so far, from the history so that it survives a resume (scaling sweeps read it)
            metrics["train/cumulative_flops"] = metrics["train/flops"] + sum(h.get("train/flops", 0.0) for h in progress.history)
        except _Diverged as diverged:  # every rank stops; the last good checkpoint stays the run's latest
            if logger:
                message = non_finite_message(epoch, diverged.step, diverged.value, progress.history)
                logger.say(message)
                (worker.run_folder / NON_FINITE_MARKER).write_text(message)
            return
        if windows:  # one pass: the model that has seen every window so far is the result
            progress.best_state = full_state_dict(worker.core, worker.rank)
        else:
            model = worker.whole_model() if evaluates(cfg, epoch) else None
            if worker.rank == 0:
                evaluate_and_select(worker, model, splits, metrics, epoch, progress)
        if logger:
            logger.log_epoch(metrics, epoch, progress.best)
        progress.epoch = epoch
        progress.history.append(metrics)
        stop = should_stop(worker, progress)
        report(worker, progress, metrics, stop)
        if stop:
            if logger:
                request = worker.run_folder / STOP_REQUEST
                logger.say(request.read_text() if request.is_file() else
                           f"early stop: no better {selection_metric(cfg)} for {cfg.train.early_stopping_patience} evaluations")
            break


def train_split_name(cfg: ExperimentConfig) -> str:
    """"train", or "valid" (= train + each user's validation target, as the paper's code trains)."""
    return "train" if cfg.train.train_on == "train" else "valid"


def setup_and_resume(cfg: ExperimentConfig, run_folder: Location,
                     start: StartingPoint | None = None) -> tuple[Worker, Progress]:
    """Threads, seed, device, model and optimizer; then the latest checkpoint, if any, else `start`'s state."""
    import ray.train

    ctx = ray.train.get_context()
    t = cfg.train
    torch.set_num_threads(t.threads_per_worker or max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    model = build_model(cfg)
    checkpoint = ray.train.get_checkpoint()
    initial = read_starting_state(start) if start and not checkpoint else None
    if initial:  # whole tables, before any sharding
        model.load_state_dict(initial["model"])
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sharded = cfg.model.embedding_sharding == "row_wise"
    tables = shard_item_tables(model.to(device), world, device) if sharded else []
    hyper = dict(lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    item_tables = [model.get_parameter(f"{name}.weight") for name in item_table_names(model)]
    optimizer = build_optimizer(optimizer_groups(model, tables), item_tables, t.embedding_optimizer, **hyper)
    if checkpoint:
        with checkpoint.as_directory() as folder:
            progress = restore(folder, model, optimizer, hyper, rank)
    else:
        if initial and initial.get("optimizer") and not sharded:
            optimizer.load_state_dict(initial["optimizer"])
            for group in optimizer.param_groups:
                group.update(hyper)  # the run's settings, not those the state was trained with
        progress = Progress(best_state=full_state_dict(model, rank))
    wrapped = ray.train.torch.prepare_model(model)  # DDP when world > 1 (the sharded tables left out), on the device
    worker = Worker(cfg, rank, world, device, wrapped, model, optimizer, run_folder,
                    batch_spec(cfg, training=True), batch_spec(cfg), sharded)
    return worker, progress


def train_window(w: Worker, window: int, table, say=None) -> dict:
    """One_pass mode: the window's train.window_passes passes over its events (each its own shuffle and
    negatives; the first as a single pass) -> one window's metrics: the mean loss, the summed time and FLOPs."""
    passes = [train_one_epoch(w, window, table, say, repeat) for repeat in range(w.cfg.train.window_passes)]
    if len(passes) == 1:
        return passes[0]
    seconds = sum(p["train/epoch_seconds"] for p in passes)
    rates = {key: sum(p[key] * p["train/epoch_seconds"] for p in passes) / seconds
             for key in ("train/examples_per_s", "train/tokens_per_s")}
    return {**passes[-1], **rates, "train/loss": sum(p["train/loss"] for p in passes) / len(passes),
            "train/epoch_seconds": seconds, "train/flops": sum(p["train/flops"] for p in passes),
            "train/window_passes": float(len(passes))}


def train_one_epoch(w: Worker, epoch: int, train_table, say=None, repeat: int = 0) -> dict:
    """One pass over the training data (or train.steps_per_epoch steps) -> the epoch's metrics (_Diverged if
    the loss became nan/inf). say: rank 0's logger; an epoch longer than PROGRESS_EVERY_S shows progress.
    Each step's lr follows train.lr_schedule over train.epochs x the planned steps of an epoch, from the
    step's place in the run (so a resumed run takes it up where it was; train/lr: the epoch's last).
    repeat: a one_pass window's pass after its first (train_window)."""
    import ray.train

    cfg = w.cfg
    if train_table is not None:
        batches = replicated_batches(train_table, w.train_spec, cfg, epoch, w.rank, w.world, repeat)
    else:
        batches = streaming_batches(ray.train.get_dataset_shard("train"), w.train_spec, cfg, epoch, w.rank,
                                    w.world, repeat)
    planned = planned_steps(cfg, train_table)
    started = last_said = time.time()
    w.model.train()
    loss_sum, steps, examples, tokens, flops = 0.0, 0, 0, 0, 0.0
    flop_model = FlopModel.from_config(cfg)
    ranking_step = RankingStep(cfg) if is_ranking(cfg) else None  # interleaved batches, multi-task loss
    for step, (batch, negatives) in enumerate(batches):
        batch = {k: v.to(w.device) for k, v in batch.items()}
        if ranking_step:
            loss = ranking_step(w, batch, negatives, epoch)
        else:
            users = w.model(batch["item_ids"], batch["timestamps"], batch["target_timestamps"], batch["offsets"])
            count = w.all_reduce(torch.tensor([float((batch["target_ids"] > 0).sum())], device=w.device))
            loss = w.retrieval_loss(users, batch["target_ids"], negatives, count.clamp(min=1) / w.world)
        if w.all_reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0])).item():
            raise _Diverged(step, float(loss))
        w.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        set_scheduled_lr(w.optimizer, cfg.train.lr, epoch * planned + step, cfg.train.epochs * planned,
                         cfg.train.lr_schedule)
        w.optimizer.step()
        loss_sum += float(loss.detach()) / w.world
        steps += 1
        examples += len(batch["users"])
        tokens += len(batch["item_ids"])
        flops += flop_model.batch(batch["offsets"], batch["target_ids"])
        if say and time.time() - last_said >= PROGRESS_EVERY_S:
            last_said = time.time()
            say(progress_line(epoch, steps, planned, tokens * w.world, last_said - started))
        if steps == cfg.train.steps_per_epoch:  # the same step on every worker: each has its share of a batch
            break
    # the global loss and counts, as one worker would see them
    loss_sum, examples, tokens, flops = w.all_reduce(
        torch.tensor([loss_sum, examples, tokens, flops], dtype=torch.float64)).tolist()
    seconds = time.time() - started
    return {"epoch": epoch + 1, "train/loss": loss_sum / max(steps, 1), "train/examples_per_s": examples / seconds,
            "train/tokens_per_s": tokens / seconds, "train/epoch_seconds": seconds, "train/flops": flops,
            "train/lr": w.optimizer.param_groups[0]["lr"],
            **(ranking_step.epoch_metrics(w, steps, seconds) if ranking_step else {})}


def planned_steps(cfg: ExperimentConfig, train_table) -> int:
    """Steps in an epoch: the training users (of the table, or from the manifest when streaming) over the
    global batch, at most train.steps_per_epoch. One pass mode: the window's users."""
    users = train_table.num_rows if train_table is not None else \
        read_manifest(cfg.data.output_dir)[f"{'train' if train_split_name(cfg) == 'train' else 'valid'}_users"]
    steps = -(-users // cfg.train.batch_size)
    return min(steps, cfg.train.steps_per_epoch or steps)


def progress_line(epoch: int, steps: int, planned: int, events: float, seconds: float) -> str:
    """Within a long epoch: how far, how fast (events: all workers', from rank 0's count x workers), how long."""
    eta = seconds / steps * max(planned - steps, 0)
    left = f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.0f} min"
    return (f"epoch {epoch + 1}: step {steps:,} of {planned:,} ({steps / planned:.0%}), ~{events / seconds:,.0f} "
            f"events/s, epoch ETA {left}")


def validates(cfg: ExperimentConfig, epoch: int) -> bool:
    """Whether epoch (0-based) ends with ranking the validation split (every eval.every, and the last)."""
    return (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.train.epochs


def evaluates(cfg: ExperimentConfig, epoch: int) -> bool:
    """Whether epoch ends with any evaluation: validation, or the test split of eval.test_epochs."""
    return validates(cfg, epoch) or epoch + 1 in cfg.eval.test_epochs


def evaluate_and_select(w: Worker, model: torch.nn.Module | None, splits: dict, metrics: dict, epoch: int,
                        progress: Progress) -> None:
    """Rank 0: rank the validation split (every eval.every epochs) with `model` (Worker.whole_model); when
    it improves (or, training on train+valid, always) rank the test split and keep this model as the best."""
    cfg, ev = w.cfg, w.cfg.eval
    started = time.time()

    def rank(split: str) -> dict:
        batches = evaluation_batches(splits[split], w.eval_spec, ev.batch_size)
        scores = ranking_evaluator(cfg) if is_ranking(cfg) else evaluate
        return {f"{split}/{'targets' if k == 'count' else k}": v
                for k, v in scores(model, batches, ties=ev.ties).items()}

    if epoch + 1 in ev.test_epochs:
        metrics.update(rank("test"))
    if validates(cfg, epoch):
        valid_started = time.time()
        metrics.update(rank("valid"))
        metrics["valid_seconds"] = time.time() - valid_started  # one full ranking of the split
        selecting = cfg.train.train_on == "train"
        key = selection_metric(cfg)
        if not selecting or metrics[key] > progress.best.get(key, -math.inf):
            test = {k: v for k, v in metrics.items() if k.startswith("test/")} or rank("test")
            progress.best = {**{k: v for k, v in metrics.items() if k.startswith("valid/")},
                             **test, "best_epoch": epoch + 1}
            progress.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    metrics["eval_seconds"] = time.time() - started


def score_window(w: Worker, table, window: int, progress: Progress) -> dict:
    """One_pass mode: rank the window's events with the model before training on them (rank 0; with sharded
    tables every worker, each against its own block: genrec.train.sharding.local_catalog); from the second
    window on, add them to the run's stream metrics. The latest model is the result."""
    started = time.time()
    ev = w.cfg.eval
    scored = evaluate_window(w.core, table, w.eval_spec, ev.batch_size, ev.ties, ev.window_users,
                             catalog=local_catalog if w.sharded else whole_catalog)
    if window > 0 and scored["window/targets"]:
        progress.best = {**progress.best, **add_to_stream(progress.best, scored), "best_epoch": window + 1}
    scored["eval_seconds"] = time.time() - started
    return scored


def evaluation_targets_line(cfg: ExperimentConfig, splits: dict, max_seq_len: int) -> str:
    """What evaluation scores: every target of valid and test (of the eval.users sample), each from its
    most recent events."""
    counts = ", ".join(f"{split} {count_targets(table):,} targets of {pc.count_distinct(table['user']).as_py():,} "
                       f"users" for split, table in splits.items())
    sample = f"; a fixed {cfg.eval.users:.1%} of the users (eval.users)" if cfg.eval.users < 1 else ""
    return f"evaluation: {counts} (every event from each user's eval_start on, each scored from its " \
           f"user's most recent {max_seq_len} events before it{sample})"


def patience_started(cfg: ExperimentConfig, best: dict) -> bool:
    """Rankers count patience only once the best model beats the base rate (valid mean NE < 1, i.e.
    ne_gain > 0): before that, a model still at NE ~1.0 would be stopped untrained."""
    return not is_ranking(cfg) or best.get(RANKING_SELECTION_METRIC, -math.inf) > 0


def should_stop(w: Worker, progress: Progress) -> bool:
    """Early stopping (or a sweep's stop request), decided on rank 0 from the history (so it survives a
    resume), shared with all ranks. Patience: evaluations since the best one, once patience_started."""
    patience = w.cfg.train.early_stopping_patience
    best_epoch = progress.best.get("best_epoch", 0)
    since_best = sum(1 for h in progress.history if selection_metric(w.cfg) in h and h["epoch"] > best_epoch) \
        if patience_started(w.cfg, progress.best) else 0
    requested = w.rank == 0 and (w.run_folder / STOP_REQUEST).is_file()
    flag = torch.tensor([1.0 if w.rank == 0 and (requested or (patience and since_best >= patience)) else 0.0])
    if w.world > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def report(w: Worker, progress: Progress, metrics: dict, stopped: bool) -> None:
    """Hand the epoch to Ray Train, with a checkpoint from rank 0."""
    import ray.train
    from ray.train import Checkpoint

    summary = {**metrics, **{f"best/{k}": v for k, v in progress.best.items()}, "stopped_early": stopped}
    with tempfile.TemporaryDirectory() as folder:
        if w.rank == 0 or w.sharded:  # sharded: each rank writes its blocks; Ray Train merges the folders
            save_checkpoint(Path(folder), w.core, w.optimizer, progress, w.rank, w.sharded)
            ray.train.report(summary, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(summary)


def non_finite_message(epoch: int, step: int, value: float, history: list) -> str:
    last = f"epoch {history[-1]['epoch']}" if history else "none (no epoch finished)"
    return (f"loss became {value} at epoch {epoch + 1}, step {step}; training stopped. "
            f"Last good checkpoint: {last}. Lower train.lr or check the data.")
