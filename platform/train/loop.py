"""The per-worker training loop that Ray Train runs (one copy per worker, DDP between them).

Determinism is by construction, so a restart from a checkpoint replays exactly
what an uninterrupted run would have done, and the number of workers does not
change the maths (data_mode "replicated"):
- epoch e shuffles users with seed (seed, e); every worker sees the same global
  batches and takes its rank's slice of each;
- negatives are drawn for the whole global batch from a generator seeded by
  (seed, e, step), and each worker keeps its rows;
- the loss is a sum over this worker's target positions divided by the global
  count, times the world size (DDP averages gradients over workers);
- checkpoints hold model, optimizer, the torch RNG state, the epoch reached and
  the best model so far.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from ..config import ExperimentConfig
from ..data.batches import build_batch
from ..data.loader import BatchSpec, iter_torch_batches, read_split, to_torch
from ..model import build_encoder
from ..model.losses import sample_negatives, softmax_loss_with_negatives
from .evaluation import evaluate

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"
SELECTION_METRIC = "valid/ndcg@10"
NON_FINITE_MARKER = "non_finite_loss.txt"  # written beside the checkpoints when a run stops on nan/inf


class NonFiniteLossError(FloatingPointError):
    pass


def encoder_from_config(cfg: ExperimentConfig, num_items: int):
    m = cfg.model
    return build_encoder(m.kind, num_items, cfg.data.max_seq_len, m.dim, m.num_blocks, m.num_heads,
                         m.qk_dim, m.v_dim, m.ffn_dim, m.dropout)


def batch_spec(cfg: ExperimentConfig, stochastic: bool = False) -> BatchSpec:
    if cfg.data.layout != "items":
        raise ValueError("training supports data.layout 'items' today (the interleaved encoder is not built yet)")
    alpha = cfg.train.stochastic_length_alpha if stochastic else None
    return BatchSpec.from_prepared(cfg.data.output_dir, "items", cfg.data.max_seq_len, alpha)


def _save(folder: Path, model, optimizer, epoch: int, best: dict, best_state, history: list) -> None:
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
        "epoch": epoch, "best": best, "history": history,
    }, folder / STATE_FILE)
    torch.save(best_state, folder / BEST_FILE)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    tracking_run = loop_config.get("mlflow_run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.train
    torch.set_num_threads(t.threads_per_worker or max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")

    spec = batch_spec(cfg, stochastic=True)
    eval_spec = batch_spec(cfg)
    model = encoder_from_config(cfg, spec.num_items)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    start_epoch, best, history = 0, {}, []
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
            best_state = torch.load(Path(folder) / BEST_FILE, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the config, not the checkpoint, sets the hyper-parameters
            group.update(lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        if rank == 0:
            print(f"[train] resumed from checkpoint after epoch {state['epoch'] + 1}")
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1, moved to the device
    core = model.module if hasattr(model, "module") else model

    if t.data_mode == "replicated":
        train_table = read_split(cfg.data.output_dir, "train")
    valid = read_split(cfg.data.output_dir, "valid") if rank == 0 else None
    test = read_split(cfg.data.output_dir, "test") if rank == 0 else None
    client = _mlflow_client(cfg) if (rank == 0 and tracking_run) else None
    started = time.time()
    # evaluations since the best one (restored from the history, so early stopping survives a resume)
    epochs_without_gain = sum(1 for h in history if SELECTION_METRIC in h and h["epoch"] > best.get("best_epoch", 0))

    for epoch in range(start_epoch, t.epochs):
        epoch_start = time.time()
        model.train()
        loss_sum, steps, examples, tokens = 0.0, 0, 0, 0
        if t.data_mode == "replicated":
            batches = _replicated_batches(train_table, spec, t, epoch, rank, world)
        else:
            shard = ray.train.get_dataset_shard("train")
            batches = ((b, None) for b in iter_torch_batches(shard, spec, max(1, t.batch_size // world),
                                                              seed=t.seed * 100_003 + epoch))
        for step, (batch, negatives) in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            users = model(batch["item_ids"], batch["timestamps"], batch["target_timestamps"], batch["offsets"])
            has_target = batch["target_ids"] > 0
            count = torch.tensor([float(has_target.sum())], device=device)
            if world > 1:
                dist.all_reduce(count)
            if negatives is None:  # streaming: each worker draws its own
                generator = torch.Generator().manual_seed(((t.seed * 1_000_003 + epoch) * 100_003 + step) * 64 + rank)
                negatives = sample_negatives(batch["target_ids"][has_target].cpu(), spec.num_items, t.num_negatives,
                                             t.in_batch_negatives, generator)
            item_vectors = core.all_item_embeddings()
            if has_target.any():
                mean = softmax_loss_with_negatives(users[has_target], batch["target_ids"][has_target],
                                                   negatives.to(device), item_vectors, t.temperature)
                loss = mean * has_target.sum() / count.clamp(min=1) * world
            else:  # nothing to predict here this step: a zero that still joins DDP's gradient sync
                loss = users.sum() * 0 + item_vectors.sum() * 0
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
            if world > 1:
                dist.all_reduce(bad)
            if bad.item():  # every rank stops; the last good checkpoint stays the run's latest
                if rank == 0:
                    message = non_finite_message(epoch, step, float(loss), history)
                    print(f"[train] {message}", flush=True)
                    (Path(t.storage_path) / loop_config["run_name"] / NON_FINITE_MARKER).write_text(message)
                return
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) / world
            steps += 1
            examples += len(batch["users"])
            tokens += len(batch["item_ids"])
        totals = torch.tensor([loss_sum, examples, tokens], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)  # the global loss and counts, as one worker would see them
        loss_sum, examples, tokens = totals.tolist()
        seconds = time.time() - epoch_start
        metrics = {"epoch": epoch + 1, "train/loss": loss_sum / max(steps, 1),
                   "train/examples_per_s": examples / seconds, "train/tokens_per_s": tokens / seconds,
                   "train/epoch_seconds": seconds}
        ev = cfg.eval
        rank_split = lambda table: evaluate(core, iter_torch_batches(table, eval_spec, ev.batch_size, shuffle=False),
                                            ties=ev.ties)
        if rank == 0 and epoch + 1 in ev.test_epochs:
            metrics.update({f"test/{k}": v for k, v in rank_split(test).items() if k != "count"})
        if rank == 0 and ((epoch + 1) % ev.every == 0 or epoch + 1 == t.epochs):
            valid_started = time.time()
            valid_metrics = rank_split(valid)
            metrics["valid_seconds"] = time.time() - valid_started  # one full ranking of the split
            metrics.update({f"valid/{k}": v for k, v in valid_metrics.items() if k != "count"})
            if metrics[SELECTION_METRIC] > best.get(SELECTION_METRIC, -1.0):
                test_metrics = rank_split(test)
                best = {**{k: v for k, v in metrics.items() if k.startswith("valid/")},
                        **{f"test/{k}": v for k, v in test_metrics.items() if k != "count"}, "best_epoch": epoch + 1}
                best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
                epochs_without_gain = 0
            else:
                epochs_without_gain += 1
        metrics["eval_seconds"] = time.time() - epoch_start - seconds
        history.append(metrics)
        stop = bool(t.early_stopping_patience and epochs_without_gain >= t.early_stopping_patience)
        if rank == 0:
            _print_epoch(metrics, epoch, t.epochs, started, start_epoch, best)
            if client:
                client.log_batch(tracking_run, metrics=_mlflow_metrics(metrics, epoch))
        flags = torch.tensor([1.0 if stop else 0.0])
        if world > 1:
            dist.broadcast(flags, src=0)
        with tempfile.TemporaryDirectory() as folder:
            report = {**metrics, **{f"best/{k}": v for k, v in best.items()}, "stopped_early": bool(flags.item())}
            if rank == 0:
                _save(Path(folder), core, optimizer, epoch, best, best_state, history)
                ray.train.report(report, checkpoint=Checkpoint.from_directory(folder))
            else:
                ray.train.report(report)
        if flags.item():
            if rank == 0:
                print(f"[train] early stop: no better {SELECTION_METRIC} for {t.early_stopping_patience} evaluations")
            break


def _replicated_batches(table: pa.Table, spec: BatchSpec, t, epoch: int, rank: int, world: int):
    """This rank's share of each global batch of the epoch, with its rows of the global negatives.

    Every rank draws the same shuffle, Stochastic Length cuts and negatives from the
    same seeds, so the union over ranks is exactly what one worker would train on.
    """
    rng = np.random.default_rng([t.seed, epoch])
    order = rng.permutation(table.num_rows)
    users = table["user"].to_numpy()
    for start in range(0, len(order), t.batch_size):
        rows = order[start : start + t.batch_size]
        batch = build_batch(table.take(pa.array(rows)), spec.layout, spec.max_seq_len,
                            stochastic_alpha=spec.stochastic_alpha, rng=rng)
        has_target = batch["target_ids"] > 0
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        negatives = sample_negatives(torch.from_numpy(batch["target_ids"][has_target]), spec.num_items,
                                     t.num_negatives, t.in_batch_negatives, generator)
        mine = np.isin(batch["users"], users[np.array_split(rows, world)[rank]])
        lengths = np.diff(batch["offsets"])
        tokens = np.repeat(mine, lengths)
        local = {k: v[tokens] for k, v in batch.items() if k not in ("offsets", "users")}
        local["users"] = batch["users"][mine]
        local["offsets"] = np.concatenate([[0], np.cumsum(lengths[mine])]).astype(np.int64)
        yield to_torch(local), negatives[torch.from_numpy(tokens[has_target])]


def non_finite_message(epoch: int, step: int, value: float, history: list) -> str:
    last = f"epoch {history[-1]['epoch']}" if history else "none (no epoch finished)"
    return (f"loss became {value} at epoch {epoch + 1}, step {step}; training stopped. "
            f"Last good checkpoint: {last}. Lower train.lr or check the data.")


def _print_epoch(metrics: dict, epoch: int, epochs: int, started: float, start_epoch: int, best: dict) -> None:
    elapsed = time.time() - started
    done = epoch + 1 - start_epoch
    eta = elapsed / done * (epochs - epoch - 1)
    valid = f" valid ndcg@10 {metrics['valid/ndcg@10']:.4f} hr@10 {metrics['valid/hr@10']:.4f}" if "valid/ndcg@10" in metrics else ""
    print(f"[train] epoch {epoch + 1}/{epochs} loss {metrics['train/loss']:.4f} "
          f"{metrics['train/examples_per_s']:,.0f} ex/s {metrics['train/tokens_per_s']:,.0f} tok/s "
          f"epoch {metrics['train/epoch_seconds']:.1f}s (+eval {metrics['eval_seconds']:.1f}s)"
          f"{valid} | best epoch {best.get('best_epoch', '-')} | elapsed {elapsed:.0f}s ETA {eta:.0f}s", flush=True)


def _mlflow_client(cfg: ExperimentConfig):
    from mlflow.tracking import MlflowClient

    from .tracking import tracking_uri

    return MlflowClient(tracking_uri(cfg))


def _mlflow_metrics(metrics: dict, epoch: int):
    from mlflow.entities import Metric

    from .tracking import metric_key

    now = int(time.time() * 1000)
    return [Metric(metric_key(k), float(v), now, epoch + 1) for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v)) and k != "epoch"]
