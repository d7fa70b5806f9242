"""The driver side of training: a Ray Train TorchTrainer run, tracked in MLflow.

    result = fit(cfg)     # inside a running Ray cluster (genrec.runtime.init_ray)

Re-running with the same train.run_name resumes the Ray Train run from its last
checkpoint and logs into the same MLflow run. Worker failures restart the worker
group from the last checkpoint (train.max_failures). The workers' progress lines
are printed here, so a terminal shows them without Ray's own logs.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
from pathlib import Path, PurePosixPath

from ..artifact import is_ranking, load_model
from ..config import ConfigError, ExperimentConfig
from ..data.prepared import read_manifest, split_uris
from ..storage import Location, check_writable, location
from . import tracking
from .batching import batch_spec, evaluation_batches, evaluation_split, split_target_count
from .checkpoint import read_progress
from .evaluation import evaluate
from .loop import (NON_FINITE_MARKER, STOP_REQUEST, NoModelSelectedError, NonFiniteLossError, StartingPoint,
                   selection_metric, train_loop_per_worker)
from .ranking import check_ranking_data, check_selection_tasks, ranking_evaluator
from .sharding import resolve_sharding


def _backend(cfg: ExperimentConfig) -> str:
    if cfg.train.backend != "auto":
        return cfg.train.backend
    return "nccl" if cfg.train.use_gpu else "gloo"


def workers_view(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with paths made absolute (URIs stay as they are): Ray workers run in other directories;
    model.embedding_sharding auto resolved here, once (the checkpoints' format follows it)."""
    cfg = cfg.model_copy(deep=True)
    if cfg.model.embedding_sharding == "auto":  # it depends on the catalog's size
        cfg.model.embedding_sharding = resolve_sharding(cfg, read_manifest(cfg.data.output_dir)["num_items"])
    cfg.data.output_dir = str(location(cfg.data.output_dir, "data.output_dir"))
    cfg.train.storage_path = str(location(cfg.train.storage_path, "train.storage_path"))
    cfg.tracking.tracking_uri = tracking.tracking_uri(cfg)
    return cfg


def fit(cfg: ExperimentConfig, log=print, callbacks=(), mlflow_tags: dict | None = None,
        start: StartingPoint | None = None) -> dict:
    """callbacks: Ray Train callbacks (a sweep passes Tune's report callback); mlflow_tags: set on the
    run when it is created (a sweep's trials name their parent run); start: the weights (and first window)
    a run without a checkpoint starts from (a refresh, genrec.train.refresh), else a fresh model."""
    check_before_workers(cfg, log)
    cfg = workers_view(cfg)
    t = cfg.train
    run_name = t.run_name or cfg.name
    run_folder = location(t.storage_path, "train.storage_path") / run_name
    check_resumable(cfg, run_folder)
    run_id = tracking.start_or_resume_run(cfg, run_name, mlflow_tags)
    marker = run_folder / NON_FINITE_MARKER
    marker.delete()
    trainer = torch_trainer(cfg, run_name, run_id, run_folder, callbacks, start)
    tables = ", item table row-wise over the workers" if cfg.model.embedding_sharding == "row_wise" else ""
    log(f"[train] run {run_name!r}: {t.num_workers} worker(s){tables}, backend {_backend(cfg)}, storage {run_folder}")
    result = fit_showing_progress(trainer, run_folder, log)
    if marker.is_file():
        raise NonFiniteLossError(f"{marker.read_text()} (checkpoints kept in {run_folder})")
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name!r} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        _, progress = read_progress(folder)
    best, history = progress.best, progress.history
    if t.mode == "epochs" and "best_epoch" not in best:
        raise NoModelSelectedError(no_model_message(cfg, run_name, run_folder, history))
    with tempfile.TemporaryDirectory() as tmp:  # drawn here, logged to MLflow and kept in the run folder
        plot = Path(tmp) / PLOT_FILE
        plot_history(history, plot, title=f"{run_name} ({cfg.model.kind})")
        (run_folder / PLOT_FILE).write_bytes(plot.read_bytes())
        version = tracking.log_final_model(cfg, run_id, progress.best_state, best, history, plot)
    name = cfg.tracking.registered_model or cfg.name
    for line in result_lines(cfg, best, history, f"registered {name!r} version {version}"):
        log(line)
    log(f"[train] browse: mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)} --host 127.0.0.1")
    return {"run_name": run_name, "mlflow_run_id": run_id, "registered_model": name, "version": version,
            "best": best, "history": history, "epochs_run": len(history),
            "checkpoint": str(run_folder / PurePosixPath(result.checkpoint.path).name),
            "test_epochs": tested_epochs(cfg, history)}


def check_storage(cfg: ExperimentConfig) -> None:
    """train.storage_path takes a small write: a missing bucket, refused credentials or a read-only grant
    is one line naming the key, not a worker's failure after its first epoch."""
    check_writable(location(cfg.train.storage_path, "train.storage_path"), "train.storage_path")


def check_before_workers(cfg: ExperimentConfig, log) -> None:
    """What can be refused from the driver, before any worker starts and any epoch is spent."""
    check_storage(cfg)
    read_manifest(cfg.data.output_dir)  # fails clearly if the data was not prepared
    check_ranking_data(cfg)  # the tasks and layout against the prepared data
    for warning in check_selection_tasks(cfg):  # refuses when no task could select a model
        log(f"[train] warning: {warning}")
    tracking.check_registered_kind(cfg)  # the registered name must not hold another model.kind
    check_streaming_cpus(cfg, log)


def check_streaming_cpus(cfg: ExperimentConfig, log) -> None:
    """The streaming data mode reads the split with Ray Data tasks while the workers train; with every CPU
    held by a training worker those tasks never start and the run waits forever, saying nothing. Refused
    on a local cluster; a warning on a joined one, which may add nodes."""
    import ray

    t = cfg.train
    if t.data_mode != "streaming" or not ray.is_initialized():
        return
    cpus = ray.cluster_resources().get("CPU", 0.0)
    left = cpus - t.num_workers * t.cpus_per_worker
    if left >= 1:
        return
    message = (f"train.data_mode='streaming' reads the training split with Ray Data tasks (1 CPU each) while the "
               f"workers train, and {t.num_workers} worker(s) x train.cpus_per_worker={t.cpus_per_worker:g} leave "
               f"{max(left, 0):g} of the cluster's {cpus:g} CPUs: lower train.cpus_per_worker or train.num_workers "
               f"so that at least 1 CPU is left")
    if cfg.ray.joins_cluster():
        log(f"[train] warning: {message} (or let the cluster add nodes)")
    else:
        raise ConfigError(message)


def torch_trainer(cfg: ExperimentConfig, run_name: str, run_id: str, run_folder: Location, callbacks=(),
                  start: StartingPoint | None = None):
    """The Ray Train run: the per-worker loop, its workers and where its checkpoints go (Ray Train keeps
    them on any storage pyarrow reaches, and finds them there again when the run name comes back)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    datasets = None
    if t.data_mode == "streaming":
        datasets = {"train": ray.data.read_parquet(split_uris(cfg.data.output_dir, "train"))}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "mlflow_run_id": run_id,
                           "run_folder": str(run_folder), "start": dataclasses.asdict(start) if start else None},
        torch_config=TorchConfig(backend=_backend(cfg)),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}),
                                                           **({"memory": t.memory_per_worker_gb * 2**30}
                                                              if t.memory_per_worker_gb else {})}),
        run_config=RunConfig(name=run_name, storage_path=run_folder.parent.uri,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
                             callbacks=list(callbacks)),
        datasets=datasets,
    )


def fit_showing_progress(trainer, run_folder: Location, log):
    """trainer.fit(), with the workers' progress lines (written to the run folder) shown here."""
    stop = threading.Event()
    follower = threading.Thread(target=tracking.follow_progress, args=(run_folder, log, stop), daemon=True)
    follower.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        follower.join()


def result_lines(cfg: ExperimentConfig, best: dict, history: list, registered: str) -> list[str]:
    """The run's result for the terminal: the stream metrics of a one-pass run; else the test split's
    numbers at each eval.test_epochs epoch and at the selected epoch, with how many targets were scored."""
    if "stream/hr@10" in best:
        passes = "one pass" if cfg.train.window_passes == 1 else f"{cfg.train.window_passes} passes each"
        return [f"[train] {passes} over {len(history)} windows: stream hr@10 {best['stream/hr@10']:.4f} hr@50 "
                f"{best['stream/hr@50']:.4f} ndcg@10 {best['stream/ndcg@10']:.4f} ({best['stream/targets']:,.0f} "
                f"events ranked, windows 2..{len(history)}); {registered}"]
    lines = [f"[train] epoch {epoch} (eval.test_epochs):{tracking.scores_text(cfg, scores, 'test')}"
             for epoch, scores in tested_epochs(cfg, history).items()]
    total = split_target_count(cfg.data.output_dir, "test")
    return lines + [f"[train] best epoch {best.get('best_epoch')}:{tracking.scores_text(cfg, best, 'test')} "
                    f"({best.get('test/targets', 0):,.0f} of {total:,} test targets scored); {registered}"]


def no_model_message(cfg: ExperimentConfig, run_name: str, run_folder: Location, history: list) -> str:
    """Why a run that ran its epochs has no model to register (a stop before its first evaluation, or a
    selection metric that was never a number)."""
    key = selection_metric(cfg)
    values = [h[key] for h in history if key in h]
    request = run_folder / STOP_REQUEST
    stopped = f"; it was asked to stop ({request.read_text().strip()})" if request.is_file() else ""
    why = f"{key} was never a number in its {len(values)} evaluation(s) ({values})" if values else \
        f"no evaluation ran in its {len(history)} epoch(s) (eval.every={cfg.eval.every})"
    return f"run {run_name!r} selected no model: {why}{stopped}; nothing was registered (checkpoints kept in {run_folder})"


def tested_epochs(cfg: ExperimentConfig, history: list) -> dict:
    """{epoch: its test metrics} for the epochs of eval.test_epochs the run reached."""
    return {h["epoch"]: {k: v for k, v in h.items() if k.startswith("test/")} for h in history
            if h["epoch"] in cfg.eval.test_epochs}


SHAPE_FILE = "model_shape.json"
PLOT_FILE = "training_curves.png"


RESUMABLE_CHANGES = {"dropout", "attention_impl"}  # regularisation and kernel choice: the same weights load


def check_resumable(cfg: ExperimentConfig, run_folder: Location) -> None:
    """A run resumes from the checkpoints in its folder, so the folder must belong to the same model:
    the keys that define it (model.* but RESUMABLE_CHANGES, the ranking tasks, the prepared data) are
    recorded at the first start and compared at every later one, before any worker starts."""
    shape = {f"model.{key}": value for key, value in cfg.model.model_dump(mode="json").items()
             if key not in RESUMABLE_CHANGES}
    shape["ranking.tasks"] = cfg.ranking.model_dump(mode="json")["tasks"]
    shape["data.output_dir"] = cfg.data.output_dir
    record = run_folder / SHAPE_FILE
    if record.is_file() and has_checkpoints(run_folder):
        before = json.loads(record.read_text())
        changed = [key for key in shape if key in before and before[key] != shape[key]]  # keys added since: no record
        if changed:
            raise ConfigError(f"run {run_folder.name!r} has checkpoints of a different model in {run_folder} "
                              f"(changed: {', '.join(changed)}); set train.run_name to a new name, or remove "
                              "that folder to start over")
    record.write_text(json.dumps(shape, indent=1, sort_keys=True))


def has_checkpoints(run_folder: Location) -> bool:
    """Whether Ray Train has kept a checkpoint in the run folder: a file in a checkpoint_* folder (on object
    stores: under that key prefix; Train's checkpoint_manager_snapshot.json beside them is not one)."""
    relative = (file.path.removeprefix(run_folder.path + "/") for file in run_folder.list_files())
    return any(path.startswith("checkpoint_") and "/" in path for path in relative)


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
    cfg's data, with the evaluator the training loop uses for its kind: full-ranking retrieval
    metrics for hstu / sasrec, per-task AUC / NE (and, for gr, retrieval metrics) of its own
    ranking tasks for gr / dlrm. The model keeps its own shape (model and ranking sections);
    batching and evaluation settings come from cfg, and batches may not keep more items than
    the model was built for."""
    model, model_cfg = load_model(model_uri, tracking.tracking_uri(cfg))
    built_for = model_cfg.model.max_seq_len
    if cfg.batching.max_seq_len and cfg.batching.max_seq_len > built_for:
        raise ConfigError(f"batching.max_seq_len={cfg.batching.max_seq_len} exceeds the max_seq_len={built_for} "
                          f"that model {model_uri} was built for")
    if is_ranking(model_cfg) != (cfg.batching.layout == "interleaved"):
        raise ConfigError(f"batching.layout={cfg.batching.layout!r} does not fit model {model_uri} "
                          f"(model.kind={model_cfg.model.kind!r}, which reads the {model_cfg.batching.layout!r} layout)")
    run_cfg = model_cfg.model_copy(update={"data": cfg.data, "batching": cfg.batching, "eval": cfg.eval})
    spec = batch_spec(run_cfg)
    batches = evaluation_batches(evaluation_split(cfg.data.output_dir, split, spec.keep_items, cfg.eval.users), spec,
                                 cfg.eval.batch_size)
    scores = ranking_evaluator(run_cfg) if is_ranking(model_cfg) else evaluate
    return scores(model, batches, ties=cfg.eval.ties)
