"""Training checkpoints: what a resumed run needs to replay exactly what an
uninterrupted run would have done, and what the driver reads back at the end.

    state.pt        model, optimizer, torch RNG state, the last finished epoch,
                    the best metrics so far and the per-epoch history
    best_model.pt   the state dict of the best model so far
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"


@dataclass
class Progress:
    """Where a run stands: the last finished epoch (0-based, -1 before any), the best
    metrics so far (with best_epoch), the history of per-epoch metrics, the best weights."""

    epoch: int = -1
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    best_state: dict | None = None


def save_checkpoint(folder: Path, model, optimizer, progress: Progress) -> None:
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
        "epoch": progress.epoch, "best": progress.best, "history": progress.history,
    }, folder / STATE_FILE)
    torch.save(progress.best_state, folder / BEST_FILE)


def read_progress(folder: str | Path) -> tuple[dict, Progress]:
    """(the raw state with model/optimizer/RNG, the run's progress) of a checkpoint folder."""
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, weights_only=True)
    best_state = torch.load(folder / BEST_FILE, weights_only=True)
    return state, Progress(state["epoch"], state["best"], state["history"], best_state)


def restore(folder: str | Path, model, optimizer, hyper_parameters: dict) -> Progress:
    """Load a checkpoint into model and optimizer and restore the torch RNG.
    `hyper_parameters` (lr, betas, weight_decay) come from the config, not the checkpoint."""
    state, progress = read_progress(folder)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group.update(hyper_parameters)
    torch.set_rng_state(state["torch_rng"])
    return progress
