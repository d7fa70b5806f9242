"""The driver side of training: a Ray Train TorchTrainer run, tracked in MLflow.

    result = fit(cfg)     # inside a running Ray cluster (genrec.runtime.init_ray)

Re-running with the same train.run_name resumes the Ray Train run from its last
checkpoint and logs into the same MLflow run. Worker failures restart the worker
group from the last checkpoint (train.max_failures).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..config import ExperimentConfig, resolve_path
from ..data.pipeline import read_manifest
from . import tracking
from .loop import BEST_FILE, NON_FINITE_MARKER, STATE_FILE, NonFiniteLossError, train_loop_per_worker


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


def fit(cfg: ExperimentConfig, log=print) -> dict:
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    read_manifest(cfg.data.output_dir)  # fails clearly if the data was not prepared
    cfg = workers_view(cfg)
    t = cfg.train
    run_name = t.run_name or cfg.name
    storage = resolve_path(t.storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_or_resume_run(cfg, run_name)
    marker = storage / run_name / NON_FINITE_MARKER
    marker.unlink(missing_ok=True)
    datasets = None
    if t.data_mode == "streaming":
        datasets = {"train": ray.data.read_parquet(str(resolve_path(cfg.data.output_dir) / "train"))}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "mlflow_run_id": run_id, "run_name": run_name},
        torch_config=TorchConfig(backend=_backend(cfg)),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep)),
        datasets=datasets,
    )
    log(f"[train] run {run_name!r}: {t.num_workers} worker(s), backend {_backend(cfg)}, storage {storage / run_name}")
    result = trainer.fit()
    if marker.exists():
        raise NonFiniteLossError(f"{marker.read_text()} (checkpoints kept in {storage / run_name})")
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name!r} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
        best_state = torch.load(Path(folder) / BEST_FILE, weights_only=True)
    best, history = state["best"], state["history"]
    plot = storage / run_name / "training_curves.png"
    plot_history(history, plot, title=f"{run_name} ({cfg.model.kind})")
    version = tracking.log_final_model(cfg, run_id, best_state, best, history, plot)
    name = cfg.tracking.registered_model or cfg.name
    log(f"[train] best epoch {best.get('best_epoch')}: test ndcg@10 {best.get('test/ndcg@10', float('nan')):.4f} "
        f"hr@10 {best.get('test/hr@10', float('nan')):.4f}; registered {name!r} version {version}")
    log(f"[train] browse: mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)} --host 127.0.0.1")
    return {"run_name": run_name, "mlflow_run_id": run_id, "registered_model": name, "version": version,
            "best": best, "history": history, "checkpoint": result.checkpoint.path, "epochs_run": len(history)}


def plot_history(history: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [h["train/loss"] for h in history])
    left.set(xlabel="epoch", ylabel="train loss", title="training loss")
    evaluated = [h for h in history if "valid/ndcg@10" in h]
    for key in ("valid/ndcg@10", "valid/hr@10"):
        right.plot([h["epoch"] for h in evaluated], [h[key] for h in evaluated], marker=".", label=key)
    right.set(xlabel="epoch", title="validation (full ranking)")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_model(cfg: ExperimentConfig, model_uri: str, split: str) -> dict:
    """Evaluate a registered model (`models:/name/version`) or a model folder on a split."""
    from ..data.loader import iter_torch_batches, read_split
    from .evaluation import evaluate
    from .loop import batch_spec

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(model_uri) if Path(model_uri).is_dir() else tracking.download_model(cfg, model_uri, Path(tmp))
        encoder, model_cfg = tracking.load_encoder(folder)
    model_cfg = model_cfg.model_copy(update={"data": cfg.data})
    spec = batch_spec(model_cfg)
    table = read_split(cfg.data.output_dir, split)
    return evaluate(encoder, iter_torch_batches(table, spec, cfg.eval.batch_size, shuffle=False), ties=cfg.eval.ties)
