"""MLflow and the run's progress: one MLflow run per training run (found again by
name when a job is re-submitted), per-epoch metrics and progress lines from the
MetricLogger, and the final model logged and registered with its metrics.

The database and the artifacts live together: by default
outputs/mlflow.db and outputs/mlartifacts/ (never ./mlruns of whatever folder a
job ran in)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ..artifact import is_ranking, save_model_folder
from ..config import ExperimentConfig, resolve_path
from ..errors import GenrecError
from ..storage import Location

RUN_NAME_TAG = "genrec.run_name"
MODEL_FILES = "model_files"
PROGRESS_FILE = "progress.log"  # beside the run's checkpoints; the driver prints what the workers write


def metric_key(name: str) -> str:
    """MLflow names allow no '@': valid/ndcg@10 -> valid/ndcg_at_10."""
    return name.replace("@", "_at_")


def tracking_uri(cfg: ExperimentConfig) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI (e.g. a shared `mlflow server`), else a
    sqlite file under outputs/ (GENREC_ROOT)."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = resolve_path("outputs/mlflow.db")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _artifact_location(uri: str) -> str | None:
    """Beside a sqlite database: <db folder>/mlartifacts. Servers keep their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _experiment_id(client: MlflowClient, cfg: ExperimentConfig) -> str:
    found = client.get_experiment_by_name(cfg.tracking.experiment)
    if found:
        return found.experiment_id
    return client.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_location(tracking_uri(cfg)))


def start_or_resume_run(cfg: ExperimentConfig, run_name: str, tags: dict | None = None) -> str:
    """The MLflow run for this training run name: found again when a job is re-submitted."""
    client = MlflowClient(tracking_uri(cfg))
    experiment_id = _experiment_id(client, cfg)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    params = {k: str(v)[:500] for k, v in _flatten(cfg.model_dump(mode="json")).items()}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def progress_lines(run_folder: Location) -> list[str]:
    """The complete lines of the run's progress file so far (none before its first)."""
    try:
        text = (run_folder / PROGRESS_FILE).read_text()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]  # a local file caught mid-rewrite may end in part of a line: not yet


class MetricLogger:
    """Rank 0's voice: per-epoch metrics to MLflow and one progress line per event to
    the run's progress file (the driver prints it; see `follow_progress`)."""

    def __init__(self, cfg: ExperimentConfig, run_folder: Location, mlflow_run_id: str | None, start_epoch: int,
                 total: int | None = None, unit: str = "epoch") -> None:
        """total: epochs (default train.epochs), or time windows with unit "window" (one_pass mode)."""
        self.cfg = cfg
        self.client = MlflowClient(tracking_uri(cfg)) if mlflow_run_id else None
        self.run_id = mlflow_run_id
        self.progress = run_folder / PROGRESS_FILE
        self.lines = progress_lines(run_folder)  # earlier attempts' lines stay: the driver counts lines
        self.epochs, self.unit = total or cfg.train.epochs, unit
        self.started, self.start_epoch = time.time(), start_epoch

    def say(self, text: str) -> None:
        """Object stores cannot append: the whole file is written again (a few KB), as one object."""
        self.lines.append(f"[train] {text}")
        self.progress.write_text("".join(f"{line}\n" for line in self.lines))

    def log_epoch(self, metrics: dict, epoch: int, best: dict) -> None:
        if self.client:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[
                Metric(metric_key(k), float(v), now, epoch + 1) for k, v in metrics.items()
                if isinstance(v, (int, float)) and math.isfinite(float(v)) and k != "epoch"])
        elapsed = time.time() - self.started
        eta = elapsed / (epoch + 1 - self.start_epoch) * (self.epochs - epoch - 1)
        scored = "".join(scores_text(self.cfg, metrics, split) for split in ("valid", "test", "window"))
        stream = f" | stream hr@10 {best['stream/hr@10']:.4f}" if "stream/hr@10" in best else \
            f" | best epoch {best.get('best_epoch', '-')}"
        self.say(f"{self.unit} {epoch + 1}/{self.epochs} loss {metrics['train/loss']:.4f} "
                 f"{metrics['train/examples_per_s']:,.0f} ex/s {metrics['train/tokens_per_s']:,.0f} tok/s "
                 f"{self.unit} {metrics['train/epoch_seconds']:.1f}s (+eval {metrics.get('eval_seconds', 0):.1f}s)"
                 f"{scored}{stream} | elapsed {elapsed:.0f}s ETA {eta:.0f}s")


def scores_text(cfg: ExperimentConfig, metrics: dict, split: str) -> str:
    """A split's headline numbers for a progress line ('' when the split was not scored): a ranker's
    per-task NE and AUC (MSE of a regression task) and mean NE (what selects its model), then the
    retrieval NDCG@10 / HR@10 of a model that retrieves."""
    parts = []
    for task in cfg.ranking.tasks if is_ranking(cfg) else ():
        key = f"{split}/{task.name}"
        if f"{key}/ne" in metrics:
            parts.append(f"{task.name} NE {metrics[f'{key}/ne']:.4f} AUC {metrics[f'{key}/auc']:.4f}")
        elif f"{key}/mse" in metrics:
            parts.append(f"{task.name} MSE {metrics[f'{key}/mse']:.4f}")
    if f"{split}/ne_gain" in metrics:
        parts.append(f"mean NE {1 - metrics[f'{split}/ne_gain']:.4f}")
    if f"{split}/ndcg@10" in metrics:
        parts.append(f"ndcg@10 {metrics[f'{split}/ndcg@10']:.4f} hr@10 {metrics[f'{split}/hr@10']:.4f}")
    return f" {split} {', '.join(parts)}" if parts else ""


def follow_progress(run_folder: Location, print_line, stop) -> None:
    """Print the lines rank 0 adds to the run's progress file until `stop` is set (a threading.Event),
    then the rest. Lines already there (an earlier run of the same name) are skipped."""
    printed = len(progress_lines(run_folder))
    while True:
        finished = stop.wait(0.5)
        lines = progress_lines(run_folder)
        for line in lines[printed:]:
            print_line(line)
        printed = max(printed, len(lines))
        if finished:
            return


MODEL_KIND_TAG = "model_kind"


class RegisteredKindError(GenrecError, ValueError):
    """A registered model name that holds versions of another model.kind."""


def check_registered_kind(cfg: ExperimentConfig) -> None:
    """Refuse to register a model under a name whose latest version is another model.kind: a server
    following `models:/<name>/latest` would switch from, say, a gr ranker to an hstu retriever. fit calls
    this before any worker starts (jobs/train.py before Ray starts); registration calls it again, for a run
    of another kind registered meanwhile."""
    name = cfg.tracking.registered_model or cfg.name
    client = MlflowClient(tracking_uri(cfg))
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        return
    latest = max(versions, key=lambda v: int(v.version))
    # versions registered before the tag existed: the kind their run was trained with
    kind = latest.tags.get(MODEL_KIND_TAG) or client.get_run(latest.run_id).data.params.get("model.kind")
    if kind and kind != cfg.model.kind:
        raise RegisteredKindError(
            f"registered model {name!r} holds model.kind {kind!r} (version {latest.version}); this run trains "
            f"model.kind {cfg.model.kind!r}: set tracking.registered_model (e.g. {f'{name}-{cfg.model.kind}'!r}) "
            f"or name to register it under its own name")


def log_final_model(cfg: ExperimentConfig, run_id: str, state_dict: dict, best: dict, history: list,
                    plot: Path | None) -> str:
    """Log the best model under the run and register it; returns the registered version."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient(tracking_uri(cfg))
    name = cfg.tracking.registered_model or cfg.name
    check_registered_kind(cfg)
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
    tags = {"best_epoch": str(best.get("best_epoch")), MODEL_KIND_TAG: cfg.model.kind}
    tags.update({metric_key(k): f"{v:.4f}" for k, v in best.items() if k.startswith(("test/", "valid/", "stream/"))})
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return version.version
