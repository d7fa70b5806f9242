"""What every job needs: argument parsing into the typed config, Ray start-up, clean errors."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .config import RayConfig, load_config
from .errors import GenrecError


def job_arguments(description: str, argv=None, extra: Callable | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=10 (repeatable)")
    return parser.parse_args(argv)


def quiet_logs(cfg: RayConfig) -> None:
    """What a person sees is genrec's summaries and per-epoch lines (printed by the driver, see
    genrec.train.tracking.follow_progress); Ray's and MLflow's internals stay in Ray's log files, or
    off the terminal, unless ray.verbose. Set when a job loads its config, before its first MLflow or Ray call."""
    if not cfg.verbose:  # Ray Data's per-dataset INFO lines and MLflow's download bars stay off the terminal
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Started Serve", "app is ready" ...
        # "Token authentication is enabled for this Ray cluster": a new local cluster's default, announced
        # as a warning on every start. (Setting RAY_AUTH_MODE here would not do: Ray read it on import.)
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # "Creating initial MLflow database tables ..." and the like
    logging.getLogger("mlflow").setLevel(logging.INFO if cfg.verbose else logging.WARNING)


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster a job was submitted to (or cfg.address), else start a local one.

    Token authentication stays as Ray sets it up (on by default).
    """
    import ray

    if ray.is_initialized():
        return
    quiet_logs(cfg)
    quiet = dict(log_to_driver=cfg.verbose, logging_level=logging.INFO if cfg.verbose else logging.WARNING)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = cfg.verbose
    if cfg.joins_cluster():
        ray.init(address=cfg.address or os.environ["RAY_ADDRESS"], **quiet)
        return
    # Ray Train V2 re-routes print() through its logger and also tees it to the wrapped stdout.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    memory = int(cfg.object_store_memory_gb * (1 << 30)) if cfg.object_store_memory_gb else None
    ray.init(num_cpus=cfg.num_cpus, object_store_memory=memory, include_dashboard=False, **quiet)


SHUTDOWN_LOG = "outputs/logs/shutdown.log"


@contextlib.contextmanager
def shutdown_quietly(log_path: str | Path = SHUTDOWN_LOG):
    """Stopping Serve and Ray kills their actors on purpose, and Ray's error listener then prints a line
    per actor on the driver's stdout ('(raylet) ... graceful_shutdown failed ... killed by ray.kill',
    'A worker died ...', 'Controller failed to shut down within 30s'). Those expected lines go to `log_path`
    (appended) instead of the terminal;
    Ray's own log files keep their full story."""
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Ray's loggers hold the terminal's stream from before any redirect: they get the file for the duration
    loggers = [logging.getLogger(name) for name in ("ray", "ray.serve")]
    saved = [logger.handlers[:] for logger in loggers]
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        to_file = logging.StreamHandler(log)
        try:
            for logger in loggers:
                logger.handlers = [to_file]
            yield
        finally:
            for logger, handlers in zip(loggers, saved):
                logger.handlers = handlers


def stop_serving_and_ray() -> None:
    """serve.shutdown() then ray.shutdown(), their internals kept off the terminal (shutdown_quietly)."""
    import ray
    from ray import serve

    with shutdown_quietly():
        serve.shutdown()
        ray.shutdown()


def run_job(main: Callable[[argparse.Namespace], int | None], description: str, extra: Callable | None = None) -> None:
    """Run a job's main; known user errors print one line instead of a traceback (exit 2), and so does
    Ctrl-C (exit 130, the shell's code for it)."""
    args = job_arguments(description, extra=extra)
    try:
        sys.exit(main(args) or 0)
    except (GenrecError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def load_job_config(args: argparse.Namespace):
    cfg = load_config(args.config, args.overrides)
    quiet_logs(cfg.ray)
    return cfg
