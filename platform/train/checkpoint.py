"""Training checkpoints: what a resumed run needs to replay exactly what an
uninterrupted run would have done, and what the driver reads back at the end.

    state.pt        the torch RNG state, the last finished epoch, the best metrics
                    so far and the per-epoch history; model and optimizer too,
                    unless they are sharded
    sharded/        with row-wise sharded item tables (genrec.train.sharding): model
                    and optimizer as torch.distributed.checkpoint writes them, one
                    file of blocks per worker; read back by any number of workers
    best_model.pt   the state dict of the best model so far (whole tables)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import GenrecError
from .sharding import is_sharded

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"
SHARDED_FOLDER = "sharded"


@dataclass
class Progress:
    """Where a run stands: the last finished epoch (0-based, -1 before any), the best
    metrics so far (with best_epoch), the history of per-epoch metrics, the best weights."""

    epoch: int = -1
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    best_state: dict | None = None


def save_checkpoint(folder: Path, model, optimizer, progress: Progress, rank: int = 0, sharded: bool = False) -> None:
    """Rank 0 writes the run's state; sharded, every rank also writes its blocks (a collective)."""
    state = {"torch_rng": torch.get_rng_state(), "epoch": progress.epoch, "best": progress.best,
             "history": progress.history}
    if sharded:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / SHARDED_FOLDER)
    else:
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    if rank == 0:
        torch.save(state, folder / STATE_FILE)
        torch.save(progress.best_state, folder / BEST_FILE)


def read_progress(folder: str | Path, with_best_state: bool = True) -> tuple[dict, Progress]:
    """(the raw state with model/optimizer/RNG, the run's progress) of a checkpoint folder."""
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, weights_only=True)
    best_state = torch.load(folder / BEST_FILE, weights_only=True) if with_best_state else None
    return state, Progress(state["epoch"], state["best"], state["history"], best_state)


def restore(folder: str | Path, model, optimizer, hyper_parameters: dict, rank: int = 0) -> Progress:
    """Load a checkpoint into model and optimizer and restore the torch RNG (a collective when the model
    is sharded). `hyper_parameters` (lr, betas, weight_decay) come from the config, not the checkpoint."""
    folder = Path(folder)
    state, progress = read_progress(folder, with_best_state=rank == 0)  # only rank 0 logs the best model
    sharded_checkpoint, model_is_sharded = (folder / SHARDED_FOLDER).is_dir(), is_sharded(model)
    if sharded_checkpoint != model_is_sharded:
        raise CheckpointMismatchError(
            f"the checkpoint in {folder} holds {'row-wise sharded' if sharded_checkpoint else 'replicated'} item "
            f"tables, and this run's model.embedding_sharding resolves to "
            f"{'row_wise' if model_is_sharded else 'replicated'}; set model.embedding_sharding to "
            f"{'row_wise' if sharded_checkpoint else 'replicated'} to resume it (any number of workers)")
    if sharded_checkpoint:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=folder / SHARDED_FOLDER)  # re-sharded for this run's workers
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group.update(hyper_parameters)
    torch.set_rng_state(state["torch_rng"])
    return progress


class CheckpointMismatchError(GenrecError):
    """A checkpoint whose tables are sharded (or not) resumed by a run that shards them otherwise."""
