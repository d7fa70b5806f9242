"""The driver side of training: a Ray Train TorchTrainer run, tracked in MLflow.

    result = fit(cfg)     # inside a running Ray cluster (genrec.runtime.init_ray)

Re-running with the same train.run_name resumes the Ray Train run from its last
checkpoint and logs into the same MLflow run. Worker failures restart the worker
group from the last checkpoint (train.max_failures). The workers' progress lines
are printed here, so a terminal shows them without Ray's own logs.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ..config import ConfigError, ExperimentConfig, resolve_path
from ..data.loader import iter_torch_batches
from ..data.prepared import read_manifest, read_split
from . import tracking
from .artifact import load_model
from .batching import batch_spec
from .checkpoint import read_progress
from .evaluation import evaluate
from .loop import NON_FINITE_MARKER, NonFiniteLossError, train_loop_per_worker
from .ranking import check_ranking_data


def _backend(cfg: ExperimentConfig) -> str:
    if cfg.train.backend != "auto":
        return cfg.train.backend
    return "nccl" if cfg.train.use_gpu else "gloo"


def workers_view(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with paths made absolute: Ray workers run in other directories."""
    cfg = cfg.model_copy(deep=True)
    cfg.data.output_dir = str(resolve_path(cfg.data.output_dir))
    cfg.train.storage_path = str(resolve_path(cfg.train.storage_path))
    cfg.tracking.tracking_uri = tracking.tracking_uri(cfg)
    return cfg


def fit(cfg: ExperimentConfig, log=print, callbacks=(), mlflow_tags: dict | None = None) -> dict:
    """callbacks: Ray Train callbacks (a sweep passes Tune's report callback); mlflow_tags: set on the
    run when it is created (a sweep's trials name their parent run)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    read_manifest(cfg.data.output_dir)  # fails clearly if the data was not prepared
    check_ranking_data(cfg)  # the tasks and layout against the prepared data, before any worker starts
    cfg = workers_view(cfg)
    t = cfg.train
    run_name = t.run_name or cfg.name
    storage = resolve_path(t.storage_path)
    run_folder = storage / run_name
    run_folder.mkdir(parents=True, exist_ok=True)
    check_resumable(cfg, run_folder)
    run_id = tracking.start_or_resume_run(cfg, run_name, mlflow_tags)
    marker = run_folder / NON_FINITE_MARKER
    marker.unlink(missing_ok=True)
    datasets = None
    if t.data_mode == "streaming":
        datasets = {"train": ray.data.read_parquet(str(resolve_path(cfg.data.output_dir) / "train"))}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "mlflow_run_id": run_id,
                           "run_folder": str(run_folder)},
        torch_config=TorchConfig(backend=_backend(cfg)),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
                             callbacks=list(callbacks)),
        datasets=datasets,
    )
    log(f"[train] run {run_name!r}: {t.num_workers} worker(s), backend {_backend(cfg)}, storage {run_folder}")
    stop = threading.Event()
    follower = threading.Thread(target=tracking.follow_progress, args=(run_folder, log, stop), daemon=True)
    follower.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        follower.join()
    if marker.exists():
        raise NonFiniteLossError(f"{marker.read_text()} (checkpoints kept in {run_folder})")
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name!r} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        _, progress = read_progress(folder)
    best, history = progress.best, progress.history
    plot = run_folder / "training_curves.png"
    plot_history(history, plot, title=f"{run_name} ({cfg.model.kind})")
    version = tracking.log_final_model(cfg, run_id, progress.best_state, best, history, plot)
    name = cfg.tracking.registered_model or cfg.name
    if "stream/hr@10" in best:
        log(f"[train] one pass over {len(history)} windows: stream hr@10 {best['stream/hr@10']:.4f} hr@50 "
            f"{best['stream/hr@50']:.4f} ndcg@10 {best['stream/ndcg@10']:.4f} ({best['stream/targets']:,.0f} events "
            f"ranked, windows 2..{len(history)}); registered {name!r} version {version}")
    else:
        log(f"[train] best epoch {best.get('best_epoch')}: test ndcg@10 {best.get('test/ndcg@10', float('nan')):.4f} "
            f"hr@10 {best.get('test/hr@10', float('nan')):.4f}; registered {name!r} version {version}")
    log(f"[train] browse: mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)} --host 127.0.0.1")
    return {"run_name": run_name, "mlflow_run_id": run_id, "registered_model": name, "version": version,
            "best": best, "history": history, "checkpoint": result.checkpoint.path, "epochs_run": len(history)}


SHAPE_FILE = "model_shape.json"


RESUMABLE_CHANGES = {"dropout", "attention_impl"}  # regularisation and kernel choice: the same weights load


def check_resumable(cfg: ExperimentConfig, run_folder: Path) -> None:
    """A run resumes from the checkpoints in its folder, so the folder must belong to the same model:
    the keys that define it (model.* but RESUMABLE_CHANGES, the ranking tasks, the prepared data) are
    recorded at the first start and compared at every later one, before any worker starts."""
    shape = {f"model.{key}": value for key, value in cfg.model.model_dump(mode="json").items()
             if key not in RESUMABLE_CHANGES}
    shape["ranking.tasks"] = cfg.ranking.model_dump(mode="json")["tasks"]
    shape["data.output_dir"] = cfg.data.output_dir
    record = run_folder / SHAPE_FILE
    if record.exists() and any(run_folder.glob("checkpoint_*")):
        before = json.loads(record.read_text())
        changed = [key for key in shape if key in before and before[key] != shape[key]]  # keys added since: no record
        if changed:
            raise ConfigError(f"run {run_folder.name!r} has checkpoints of a different model in {run_folder} "
                              f"(changed: {', '.join(changed)}); set train.run_name to a new name, or remove "
                              "that folder to start over")
    record.write_text(json.dumps(shape, indent=1, sort_keys=True))


def plot_history(history: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [h["train/loss"] for h in history])
    left.set(xlabel="epoch", ylabel="train loss", title="training loss")
    split = "window" if any("window/ndcg@10" in h for h in history) else "valid"
    evaluated = [h for h in history if f"{split}/ndcg@10" in h]
    for key in (f"{split}/ndcg@10", f"{split}/hr@10"):
        right.plot([h["epoch"] for h in evaluated], [h[key] for h in evaluated], marker=".", label=key)
    right.set(xlabel="epoch", title="validation (full ranking)" if split == "valid" else
              "each window, ranked before training on it (one pass)")
    if split == "window":
        left.set(xlabel="window")
        right.set(xlabel="window")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_model(cfg: ExperimentConfig, model_uri: str, split: str) -> dict:
    """Evaluate a registered model (`models:/name/version`) or a model folder on a split of
    cfg's data. The model keeps its own shape (model section); batching and evaluation
    settings come from cfg, and batches may not keep more items than the model was built for."""
    encoder, model_cfg = load_model(model_uri, tracking.tracking_uri(cfg))
    built_for = model_cfg.model.max_seq_len
    if cfg.batching.max_seq_len and cfg.batching.max_seq_len > built_for:
        raise ConfigError(f"batching.max_seq_len={cfg.batching.max_seq_len} exceeds the max_seq_len={built_for} "
                          f"that model {model_uri} was built for")
    run_cfg = model_cfg.model_copy(update={"data": cfg.data, "batching": cfg.batching, "eval": cfg.eval})
    batches = iter_torch_batches(read_split(cfg.data.output_dir, split), batch_spec(run_cfg), cfg.eval.batch_size,
                                 shuffle=False)
    return evaluate(encoder, batches, ties=cfg.eval.ties)
