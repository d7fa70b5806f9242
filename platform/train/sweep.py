"""Scaling sweeps and hyper-parameter search: Ray Tune over Ray Train trials.

    summary = run_sweep(cfg)      # cfg.sweep set; inside a running Ray cluster

Every family x every point of its grid (or, with `sweep.search`, every sampled config) is
one Tune trial whose driver runs `trainer.fit` (a Ray Train run) with Tune's report
callback, so each epoch reaches Tune, and whose MLflow run is a child of the sweep's
parent run. As many trials run at once as the cluster's CPUs (and GPUs) hold. A trial
whose loss turns nan/inf stops inside the loop (and errors in Tune); one whose loss
climbs above `sweep.divergence_factor` x its lowest is stopped by Tune. Re-running the
same sweep name restores the Tune experiment: finished trials are kept, the others run
(an interrupted trial resumes from its Train checkpoint). Tune never stops a running trial
from outside: a scheduler's stop (ASHA, divergence) becomes a request the trial's Train run
honours after the epoch it is in, so Ray Train releases its workers itself. At the end: a CSV of all
trials, L(C) = a * C^(-b) + c per family (genrec.train.scaling), a log-log PNG, all
logged to the parent run; with a search, the best config as a YAML ready for jobs/train.py.

The ranking family (DLRM-style ranker) joins as one more family once its model kind
exists: `families: {dlrm: {set: {model.kind: dlrm}}}` and its FLOP terms in
genrec.train.flops.FlopModel.forward; nothing here is specific to the encoder kind.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path

import yaml
from pydantic import ValidationError
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from ..config import ConfigError, ExperimentConfig, describe_error, set_dotted
from ..storage import Location, check_writable, location, upload
from . import scaling, tracking
from .loop import STOP_REQUEST
from .trainer import fit, workers_view

COMPUTE_KEY = "train/cumulative_flops"
SWEEP_TAG = "genrec.sweep"
FAMILY_TAG = "genrec.family"
TRIALS_FILE = "trials.json"  # the sweep's trial list, to refuse resuming a sweep whose grid changed


def sweep_name(cfg: ExperimentConfig) -> str:
    return cfg.sweep.name or cfg.name


def trial_configs(cfg: ExperimentConfig) -> list[dict]:
    """The sweep's trials: [{"name", "family", "overrides", "experiment"}], each validated, in a fixed order:
    per family, each of `points` (or one empty point) crossed with the grid's product.
    A bad key or value names the trial and the key. Without a search the overrides are complete; with
    one, the sampled keys are added per trial by Tune."""
    sweep = cfg.sweep
    base = cfg.model_dump(mode="json")
    base["sweep"] = None
    name = sweep_name(cfg)
    trials = []
    for family, spec in sweep.families.items():
        grid = {**sweep.grid, **spec.grid}
        keys = list(grid)
        for point, values in itertools.product(sweep.points or [{}], itertools.product(*(grid[k] for k in keys))):
            overrides = {**spec.set, **point, **dict(zip(keys, values))}
            trial = f"{name}-{len(trials):03d}-{family}"
            experiment = experiment_for(base, overrides, trial, f"sweep.families.{family}")
            experiment["train"]["run_name"] = trial
            experiment["tracking"]["registered_model"] = f"{name}-{family}"
            trials.append({"name": trial, "family": family, "overrides": overrides, "experiment": experiment})
    return trials


def experiment_for(base: dict, overrides: dict, trial: str, origin: str) -> dict:
    """base (a config dump) with dotted overrides applied, validated; errors name the trial and key."""
    tree = json.loads(json.dumps(base))
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree).model_dump(mode="json")
    except ValidationError as err:
        raise ConfigError(describe_error(err, f"{origin}, trial {trial}")) from None


def trial_resources(cfg: ExperimentConfig) -> dict:
    """What one trial holds while it runs: its driver plus its Train workers."""
    t = cfg.train
    cpus = cfg.sweep.trial_driver_cpus + t.num_workers * t.cpus_per_worker
    return {"CPU": cpus, "GPU": float(t.num_workers) if t.use_gpu else 0.0}


def concurrency(cfg: ExperimentConfig, cluster: dict) -> int:
    """sweep.max_concurrent_trials, else as many trials as the cluster's CPUs and GPUs hold at once."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    need = trial_resources(cfg)
    fits = [math.floor(cluster.get(kind, 0.0) / amount + 1e-9) for kind, amount in need.items() if amount > 0]
    count = min(fits) if fits else 1
    if count < 1:
        raise ConfigError(
            f"one trial needs {need['CPU']:g} CPU (sweep.trial_driver_cpus {cfg.sweep.trial_driver_cpus:g} + "
            f"train.num_workers {cfg.train.num_workers} x train.cpus_per_worker {cfg.train.cpus_per_worker:g})"
            + (f" and {need['GPU']:g} GPU" if need["GPU"] else "")
            + f"; the cluster has {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU: lower them or "
            "set sweep.max_concurrent_trials (an autoscaling cluster adds nodes)")
    return count


# ----------------------------------------------------------------------------- inside Tune

def run_trial(config: dict) -> None:
    """One Tune trial: a Ray Train run of the trial's config, its epochs reported to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray import tune

    trial = config["trial"]
    experiment = experiment_for(trial["experiment"], config.get("search", {}), trial["name"], "sweep.search")
    if "search" in config:  # several sampled trials per grid point: each its own Train run (and MLflow run)
        experiment["train"]["run_name"] = run_name(config, tune.get_context().get_trial_id())
    cfg = ExperimentConfig.model_validate(experiment)
    tags = {"mlflow.parentRunId": config["parent_run_id"], SWEEP_TAG: config["sweep"], FAMILY_TAG: trial["family"]}
    fit(cfg, callbacks=[TuneReportCallback()], mlflow_tags=tags)


def run_name(config: dict, trial_id: str) -> str:
    """A trial's Train run (and MLflow run) name: the grid point's, plus Tune's trial id in a search."""
    name = config["trial"]["name"]
    return f"{name}-{trial_id}" if "search" in config else name


def trial_epochs(config: dict) -> int:
    """The epochs a trial trains (its grid point's, or a sampled train.epochs)."""
    return config.get("search", {}).get("train.epochs", config["trial"]["experiment"]["train"]["epochs"])


def trial_dirname(trial) -> str:
    """Tune's folder of a trial: its run name (Tune's default spells out the whole config)."""
    return run_name(trial.config, trial.trial_id)


class DivergenceStopper:
    """The divergence rule: a trial's train loss is not finite or rose above `factor` x its lowest so far."""

    def __init__(self, factor: float | None) -> None:
        self.factor, self.lowest, self.stopped = factor, {}, set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        loss = result.get("train/loss")
        if self.factor is None or loss is None:
            return False
        lowest = self.lowest[trial_id] = min(self.lowest.get(trial_id, math.inf), loss)
        if not math.isfinite(loss) or loss > self.factor * lowest:
            self.stopped.add(trial_id)
            return True
        return False


class StopsAtEpochEnd:
    """Scheduler behaviour shared by the sweep's schedulers: a STOP decision (ASHA's, or the divergence rule)
    becomes a stop request file in the trial's Train run folder, which the training loop honours after the
    epoch it is in (genrec.train.loop.should_stop), and Tune is told CONTINUE, so it sees the trial end by
    itself. Why: a trial Tune stops from outside is killed together with its Ray Train controller, and on
    Ray 2.60 that run's worker placement group outlives it (Train's cleaner asks the dashboard's state API,
    which a local cluster started without the dashboard lacks: ray-project/ray#54305); every early stop then
    leaked a worker's CPUs until the next trials waited forever. The request file also gives the CSV its
    status after a resume. Holds only paths (or URIs) and numbers, so Tuner.restore can unpickle it."""

    def _setup(self, runs: str, divergence_factor: float | None) -> None:
        self.runs, self.divergence = runs, DivergenceStopper(divergence_factor)
        self.requested: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result):
        if trial.trial_id in self.requested:  # ends after the epoch it is in; already ranked by the scheduler
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get("training_iteration", 0)
        reason = None
        if self.divergence(trial.trial_id, result):
            reason = (f"stopped: diverged, train loss {result.get('train/loss'):.4g} after epoch {epoch} (lowest "
                      f"{self.divergence.lowest[trial.trial_id]:.4g}, factor {self.divergence.factor:g})")
        elif decision == TrialScheduler.STOP and epoch + 1 < trial_epochs(trial.config):  # else it ends anyway
            reason = f"stopped early (scheduler): {type(self).__name__} after epoch {epoch}"
        if reason:
            self.requested.add(trial.trial_id)
            (location(self.runs) / run_name(trial.config, trial.trial_id) / STOP_REQUEST).write_text(reason)
        return TrialScheduler.CONTINUE if decision == TrialScheduler.STOP else decision


class GridScheduler(StopsAtEpochEnd, FIFOScheduler):
    """A grid sweep: every trial runs to its end, unless it diverges."""

    def __init__(self, runs: str, divergence_factor: float | None) -> None:
        FIFOScheduler.__init__(self)
        self._setup(runs, divergence_factor)


class ASHA(StopsAtEpochEnd, ASHAScheduler):
    """A search: ASHA on the sweep's metric after every epoch (max_t: the longest trial's epochs), its stops
    (and divergence) at epoch ends."""

    def __init__(self, runs: str, divergence_factor: float | None, **asha) -> None:
        ASHAScheduler.__init__(self, time_attr="training_iteration", **asha)
        self._setup(runs, divergence_factor)


_LIVE: dict[str, list] = {}  # sweep name -> the Tune callbacks of the run of it in this process (see Relay)


class Relay(Callback):
    """The one Tune callback a sweep hands Tune. Tuner.restore brings back the callbacks pickled when the
    sweep first began (with that process's log function and extras); this one holds only the sweep's name
    and forwards every hook to the callbacks the current run_sweep registered in _LIVE."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _forward(self, hook: str, **info) -> None:
        for callback in _LIVE.get(self.name, ()):
            getattr(callback, hook)(**info)

    def on_trial_start(self, **info):
        self._forward("on_trial_start", **info)

    def on_trial_result(self, **info):
        self._forward("on_trial_result", **info)

    def on_trial_complete(self, **info):
        self._forward("on_trial_complete", **info)

    def on_trial_error(self, **info):
        self._forward("on_trial_error", **info)


class SweepProgress(Callback):
    """One line per trial epoch and per finished trial, on the sweep driver's terminal."""

    def __init__(self, log, total: int, metric: str) -> None:
        self.log, self.total, self.metric = log, total, metric
        self.started, self.finished = time.time(), 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        score = result.get(self.metric)
        shown = f" {self.metric} {score:.4f}" if isinstance(score, (int, float)) else ""
        self.log(f"[sweep] {run_name(trial.config, trial.trial_id)} epoch {result.get('epoch')}: loss "
                 f"{result.get('train/loss', math.nan):.4f}{shown} compute {result.get(COMPUTE_KEY, math.nan):.3g} "
                 f"FLOPs | {self.finished}/{self.total} trials done, elapsed {time.time() - self.started:.0f}s")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        self.log(f"[sweep] {run_name(trial.config, trial.trial_id)} finished ({self.finished}/{self.total})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished += 1
        self.log(f"[sweep] {run_name(trial.config, trial.trial_id)} failed ({self.finished}/{self.total}): "
                 f"see {trial.local_path}")


# ----------------------------------------------------------------------------- the driver

def _search_space(cfg: ExperimentConfig) -> dict:
    from ray import tune

    samplers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": tune.choice}
    space = {}
    for key, spec in cfg.sweep.search.space.items():
        if len(spec) != 1:
            raise ConfigError(f"sweep.search.space.{key}: give one of uniform, loguniform, choice")
        (kind, values), = spec.items()
        space[key] = samplers[kind](values) if kind == "choice" else samplers[kind](*values)
    return space


def _check_sweepable(cfg: ExperimentConfig) -> None:
    if cfg.sweep is None:
        raise ConfigError("this config has no sweep section (see configs/sweeps/)")
    if cfg.sweep.search is not None and cfg.eval.every != 1:
        raise ConfigError(f"sweep.search needs eval.every=1 (ASHA compares trials on {cfg.sweep.metric} after "
                          f"every epoch), got {cfg.eval.every}")


def _new_tuner(cfg: ExperimentConfig, trainable, trials: list[dict], parent: str, parallel: int,
               storage: Location, name: str):
    """A Tuner for a sweep not begun yet: a grid (FIFO, divergence stops) or a search (ASHA)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep, runs = cfg.sweep, str(storage / name / "runs")
    searching = sweep.search is not None
    param_space = {"trial": tune.grid_search(trials), "parent_run_id": parent, "sweep": name}
    # max_concurrent on the generator itself: Tune ignores TuneConfig.max_concurrent_trials (with a
    # warning) when it is handed a search algorithm, which let a search start every sample at once.
    generator = BasicVariantGenerator(max_concurrent=parallel, random_state=sweep.search.seed if searching
                                      else None)
    if searching:
        s = sweep.search
        param_space["search"] = _search_space(cfg)
        longest = max(t["experiment"]["train"]["epochs"] for t in trials)
        scheduler = ASHA(runs, sweep.divergence_factor, max_t=longest, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)
        tune_config = tune.TuneConfig(num_samples=s.num_samples, metric=sweep.metric, mode=sweep.mode,
                                      scheduler=scheduler, search_alg=generator,
                                      trial_dirname_creator=trial_dirname)
    else:
        tune_config = tune.TuneConfig(scheduler=GridScheduler(runs, sweep.divergence_factor),
                                      search_alg=generator, trial_dirname_creator=trial_dirname)
    run_config = tune.RunConfig(name=name, storage_path=storage.uri, verbose=0, callbacks=[Relay(name)])
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _trial_rows(results, folder: Location, trials: list[dict], searching: bool) -> tuple[list[dict], dict]:
    """(one CSV row per trial, Tune's status per trial path) once Tuner.fit has returned."""
    from ray import tune

    status = {trial.path: trial.status for trial in tune.ExperimentAnalysis(folder.uri).trials}
    rows = [trial_row(result, status.get(result.path), str(folder / "runs")) for result in results]
    if not searching:  # Tune creates trials as slots free up: those it never reached are listed too
        started = {row["point"] for row in rows}
        rows += [{"trial": t["name"], "point": t["name"], "family": t["family"], "status": "not run", **t["overrides"]}
                 for t in trials if t["name"] not in started]
    return rows, status


def run_sweep(cfg: ExperimentConfig, log=print, callbacks=()) -> dict:
    """Run (or resume) the sweep; returns the summary (paths, fits, rows). callbacks: extra Tune callbacks."""
    import ray
    from ray import tune

    _check_sweepable(cfg)
    cfg = workers_view(cfg)
    sweep = cfg.sweep
    name = sweep_name(cfg)
    storage = location(sweep.storage_path, "sweep.storage_path")
    check_writable(storage, "sweep.storage_path")  # before Tune or any trial starts
    folder = storage / name
    trials = trial_configs(cfg)
    for trial in trials:  # the trials' Train runs live inside the sweep's folder
        trial["experiment"]["train"]["storage_path"] = str(folder / "runs")
    _check_same_trials(folder, trials, name)
    parent = tracking.start_or_resume_run(cfg, name, {"genrec.kind": "sweep"})
    parallel = concurrency(cfg, ray.cluster_resources())
    searching = sweep.search is not None
    total = len(trials) * (sweep.search.num_samples if searching else 1)
    log(f"[sweep] {name!r}: {total} trials ({', '.join(sweep.families)}), {parallel} at a time, "
        f"{trial_resources(cfg)['CPU']:g} CPU each; folder {folder}")
    # The trial's driver only waits on its Train run; the Train workers take their own resources, so
    # Tune's count of trials (not its resource accounting) is what keeps their sum within the cluster.
    trainable = tune.with_resources(run_trial, {"CPU": sweep.trial_driver_cpus})
    _LIVE[name] = [SweepProgress(log, total, sweep.metric), *callbacks]
    if not cfg.ray.verbose:  # genrec's [sweep] lines only: Tune's own tables stay off the terminal
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if tune.Tuner.can_restore(folder.uri):  # its scheduler, search state and Relay come back with it
        log(f"[sweep] resuming {folder}: finished trials are kept, the others run")
        tuner = tune.Tuner.restore(folder.uri, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = _new_tuner(cfg, trainable, trials, parent, parallel, storage, name)
    try:
        results = tuner.fit()
    finally:
        _LIVE.pop(name, None)
    rows, status = _trial_rows(results, folder, trials, searching)
    ended = sum(1 for s in status.values() if s in ("TERMINATED", "ERROR"))
    interrupted = ended < total
    return summarise(cfg, name, folder, parent, rows, log, interrupted)


def _check_same_trials(folder: Location, trials: list[dict], name: str) -> None:
    listed = [{"name": t["name"], "overrides": t["overrides"]} for t in trials]
    path = folder / TRIALS_FILE
    if path.is_file():
        if json.loads(path.read_text()) != listed:
            raise ConfigError(f"sweep {name!r} already exists in {folder} with other trials; resume it with the same "
                              "config, or set sweep.name to start another")
        return
    path.write_text(json.dumps(listed, indent=1))


def trial_row(result, tune_status: str | None, runs: str) -> dict:
    """One CSV row: the trial, its overrides, how it ended (a scheduler's stop request says why) and its
    last report."""
    config = result.config
    trial = config["trial"]
    metrics = result.metrics or {}
    name = run_name(config, metrics.get("trial_id", ""))
    request = location(runs) / name / STOP_REQUEST
    status = "finished"
    if tune_status == "ERROR":
        status = f"error: {str(result.error).splitlines()[0][:200]}"
    elif tune_status != "TERMINATED":
        status = "not run" if not metrics else "interrupted"
    elif metrics.get("training_iteration", 0) < trial_epochs(config) and request.is_file():
        status = request.read_text()
    row = {"trial": name, "point": trial["name"],
           "family": trial["family"], "status": status}
    row.update({k: v for k, v in trial["overrides"].items()})
    row.update({k: v for k, v in config.get("search", {}).items()})
    keep = ("epoch", "train/loss", "train/flops", COMPUTE_KEY, "stopped_early")
    row.update({k: v for k, v in metrics.items() if k in keep or k.startswith(("best/", "valid/", "test/"))})
    return row


def summarise(cfg: ExperimentConfig, name: str, folder: Location, parent: str, rows: list[dict], log,
              interrupted: bool) -> dict:
    """CSV, fits, plot (and the best config of a search), logged to the parent run and kept in the sweep's
    folder (written here first: the plot and CSV writers, and MLflow, take local files)."""
    import mlflow

    metric = cfg.sweep.metric
    finished = [r for r in rows if r["status"] == "finished"]  # stopped or failed trials stay out of the fit
    fits = scaling.fit_families(finished, COMPUTE_KEY, metric, cfg.sweep.fit_points, cfg.sweep.mode)
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=parent):
        staging = Path(tmp)
        scaling.write_csv(rows, staging / "trials.csv")
        scaling.plot_scaling(finished, fits, COMPUTE_KEY, metric, staging / "scaling.png",
                             title=f"{name}: {metric} vs training compute")
        (staging / "fits.json").write_text(json.dumps(scaling.fits_table(fits), indent=1))
        best = write_best_config(cfg, rows, staging, shown_as=str(folder / "best.yaml")) if cfg.sweep.search else None
        mlflow.log_artifacts(str(staging))
        upload(staging, folder)
        for law in fits.values():
            mlflow.log_metrics({f"fit/{law.family}/{p}": v for p, v in
                                (("a", law.a), ("b", law.b), ("c", law.c), ("b_err", law.b_err))
                                if math.isfinite(v)})
        mlflow.log_metrics({"trials": len(rows), "trials_finished": len(finished)})
    csv_path, plot, best_yaml = folder / "trials.csv", folder / "scaling.png", best and folder / "best.yaml"
    for law in fits.values():
        log(f"[sweep] fit {law.text()}")
    log(f"[sweep] {len(finished)}/{len(rows)} trials finished; {csv_path}, {plot}"
        + (f"; best config {best_yaml}" if best_yaml else ""))
    if interrupted:
        log("[sweep] interrupted: run the same command again to continue with the trials not yet done")
    return {"name": name, "folder": str(folder), "parent_run_id": parent, "csv": str(csv_path), "plot": str(plot),
            "fits": {k: v for k, v in fits.items()}, "rows": rows, "best_config": best_yaml and str(best_yaml),
            "interrupted": interrupted}


def write_best_config(cfg: ExperimentConfig, rows: list[dict], folder: Path,
                      shown_as: str | None = None) -> Path | None:
    """The best finished trial's full config (sampled values included), as a YAML for jobs/train.py in
    `folder`; its header's command names `shown_as` (where it will be kept), else the file written."""
    sign = 1 if cfg.sweep.mode == "max" else -1
    scored = [r for r in rows if isinstance(r.get(cfg.sweep.metric), (int, float)) and r["status"] == "finished"]
    if not scored:
        return None
    best = max(scored, key=lambda r: sign * r[cfg.sweep.metric])
    trials = {t["name"]: t for t in trial_configs(cfg)}
    sampled = {k: best[k] for k in cfg.sweep.search.space}
    experiment = experiment_for(trials[best["point"]]["experiment"], sampled, best["trial"], "sweep.search")
    experiment["train"]["run_name"] = None
    experiment["name"] = f"{sweep_name(cfg)}-best"
    path = folder / "best.yaml"
    header = (f"# best of sweep {sweep_name(cfg)!r}: trial {best['trial']}, {cfg.sweep.metric} = "
              f"{best[cfg.sweep.metric]:.4f}\n# python jobs/train.py --config {shown_as or path}\n")
    path.write_text(header + yaml.safe_dump(experiment, sort_keys=False))
    return path
