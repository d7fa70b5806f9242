"""MLflow: one run per training run (resumed by name), per-epoch metrics, the final model
as a loadable artifact (weights + config + vocabularies), registered with its metrics."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from ..config import ExperimentConfig, resolve_path

RUN_NAME_TAG = "genrec.run_name"
WEIGHTS = "model.pt"
CONFIG = "config.json"
VOCAB = "vocab"
MODEL_FILES = "model_files"


def metric_key(name: str) -> str:
    """MLflow names allow no '@': valid/ndcg@10 -> valid/ndcg_at_10."""
    return name.replace("@", "_at_")


def tracking_uri(cfg: ExperimentConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    path = resolve_path("outputs/mlflow.db")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def start_or_resume_run(cfg: ExperimentConfig, run_name: str) -> str:
    """The MLflow run for this training run name: found again when a job is re-submitted."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    client = MlflowClient(tracking_uri(cfg))
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    params = {k: str(v)[:500] for k, v in _flatten(cfg.model_dump(mode="json")).items()}
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    return run.info.run_id


def save_model_folder(folder: Path, cfg: ExperimentConfig, state_dict: dict) -> Path:
    """weights (state dict, loadable with weights_only=True) + config + vocabularies, in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    vocab = resolve_path(cfg.data.output_dir) / VOCAB
    shutil.copytree(vocab, folder / VOCAB, dirs_exist_ok=True)
    shutil.copy(resolve_path(cfg.data.output_dir) / "manifest.json", folder / "manifest.json")
    return folder


def load_encoder(folder: str | Path):
    """A model folder (or a downloaded MLflow model's artifacts) -> (encoder in eval mode, config)."""
    from .loop import encoder_from_config

    folder = Path(folder)
    cfg = ExperimentConfig.model_validate_json((folder / CONFIG).read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    encoder = encoder_from_config(cfg, manifest["num_items"])
    encoder.load_state_dict(torch.load(folder / WEIGHTS, weights_only=True))
    return encoder.eval(), cfg


def log_final_model(cfg: ExperimentConfig, run_id: str, state_dict: dict, best: dict, history: list,
                    plot: Path | None) -> str:
    """Log the best model under the run and register it; returns the registered version."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient(tracking_uri(cfg))
    name = cfg.tracking.registered_model or cfg.name
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        folder = save_model_folder(Path(tmp) / "model", cfg, state_dict)
        mlflow.log_artifacts(str(folder), artifact_path=MODEL_FILES)
        if plot is not None:
            mlflow.log_artifact(str(plot))
        mlflow.log_metrics({metric_key(f"best/{k}"): float(v) for k, v in best.items()})
        mlflow.log_dict({"history": history}, "history.json")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="genrec sequential encoder (weights + config + vocabularies)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_FILES}"
    tags = {"best_epoch": str(best.get("best_epoch"))}
    tags.update({metric_key(k): f"{v:.4f}" for k, v in best.items() if k.startswith(("test/", "valid/"))})
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return version.version


def download_model(cfg: ExperimentConfig, uri: str, into: Path) -> Path:
    """`models:/name/version` (or any artifact URI of a logged model folder) -> a local folder."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
