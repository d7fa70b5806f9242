"""What every job needs: argument parsing into the typed config, Ray start-up, clean errors."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .config import ConfigError, RayConfig, load_config


def job_arguments(description: str, argv=None, extra: Callable | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.max_seq_len=200 (repeatable)")
    return parser.parse_args(argv)


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster a job was submitted to (or cfg.address), else start a local one.

    Token authentication stays as Ray sets it up (on by default).
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray Train V2 re-routes print() through its logger and also tees it to the wrapped
    # stdout, so every progress line would show twice; plain print is what we want.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    memory = int(cfg.object_store_memory_gb * (1 << 30)) if cfg.object_store_memory_gb else None
    ray.init(num_cpus=cfg.num_cpus, object_store_memory=memory, include_dashboard=False)


def run_job(main: Callable[[argparse.Namespace], int | None], description: str, extra: Callable | None = None) -> None:
    """Run a job's main; known user errors print one line instead of a traceback (exit 2)."""
    from .data.adapters import SourceError
    from .data.pipeline import OutputExistsError
    from .train.loop import NonFiniteLossError

    args = job_arguments(description, extra=extra)
    try:
        sys.exit(main(args) or 0)
    except (ConfigError, SourceError, OutputExistsError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def load_job_config(args: argparse.Namespace):
    return load_config(args.config, args.overrides)
