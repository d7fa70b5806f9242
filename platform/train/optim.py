"""The optimizer: AdamW, with an option to update an item table only where a step touched it
(train.embedding_optimizer).

    adamw              every row of every table moves every step (the paper's recipe): a row's
                       momentum keeps moving it after its item left the batch, and the update costs
                       time in proportion to the catalog, whatever the batch holds
    row_sparse_adamw   for the item tables, only the rows whose gradient is nonzero this step are
                       updated (their moments, weight decay and weight); the rest stay as they are.
                       The "lazy" Adam of torch.optim.SparseAdam and of TorchRec's fused row-wise
                       optimizers: its cost follows the batch's distinct items, not the catalog

The touched rows are updated by torch's own AdamW (torch.optim.adamw.adamw on the gathered rows), so
the arithmetic is torch's: where every row is touched it equals torch.optim.AdamW exactly. The step
count, and with it the bias correction, is the table's: it counts every optimizer step, so every block
of a row-wise sharded table (genrec.train.sharding) shares one count whatever rows it holds. State has
AdamW's layout, so a checkpoint resumes under either optimizer.

The learning rate of each step follows train.lr_schedule (lr_factor): the loop sets it before every step
from the step's place in the run (epoch x steps per epoch + step), so a resumed run, whose groups restore
resets to train.lr, steps with the schedule's value without any scheduler state in its checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw

from ..config import LrSchedule


class RowSparseAdamW(torch.optim.AdamW):
    """torch.optim.AdamW, except that each parameter in `row_sparse` (2-D tables, plain or DTensor) is
    updated only in the rows where its gradient is nonzero."""

    def __init__(self, params, row_sparse: list[torch.nn.Parameter], **hyper) -> None:
        super().__init__(params, **hyper)
        self.row_sparse = {id(p) for p in row_sparse}
        self._updated_rows: dict[int, torch.Tensor] = {}  # per table: the rows its last step updated

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As AdamW's, except that a table's gradient, after a step, keeps its buffer with only the rows
        that step updated set to zero (the others are zero already): no pass over the whole table."""
        _forget_touched_rows(self)  # a backward without a step leaves its record behind
        kept = [p for group in self.param_groups for p in group["params"]
                if id(p) in self._updated_rows and p.grad is not None]
        for p in kept:
            _local(p.grad)[self._updated_rows.pop(id(p))] = 0
        held = [(p, p.grad) for p in kept]
        for p in kept:
            p.grad = None
        super().zero_grad(set_to_none)
        for p, grad in held:
            p.grad = grad

    @torch.no_grad()
    def step(self, closure=None):
        # AdamW skips a parameter without a gradient: the tables' gradients are held back from it
        held = [(p, p.grad, group) for group in self.param_groups for p in group["params"]
                if id(p) in self.row_sparse and p.grad is not None]
        for p, _, _ in held:
            p.grad = None
        try:
            loss = super().step(closure)
            for p, grad, group in held:
                self._touched_rows_step(p, grad, group)
        finally:
            for p, grad, _ in held:
                p.grad = grad
        return loss

    def _touched_rows_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:  # as torch.optim.AdamW initialises it (DTensor zeros keep the table's placement)
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        weight, gradient, first, second = (_local(t) for t in (p, grad, state["exp_avg"], state["exp_avg_sq"]))
        recorded = p.__dict__.pop(_TOUCHED, None)
        if recorded is None:  # a pass over the whole table
            rows = torch.nonzero(gradient.ne(0).any(dim=1)).squeeze(1)
        else:  # the same rows, from the lookups' own record: a pass over those rows only
            rows = torch.unique(recorded)
            rows = rows[gradient[rows].ne(0).any(dim=1)]
        touched = [weight[rows], gradient[rows], first[rows], second[rows]]  # copies: updated, then written back
        beta1, beta2 = group["betas"]
        adamw([touched[0]], [touched[1]], [touched[2]], [touched[3]], [], [state["step"]], foreach=False,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)  # counts the step even where no row was touched
        weight[rows], first[rows], second[rows] = touched[0], touched[2], touched[3]
        self._updated_rows[id(p)] = rows


_TOUCHED = "_genrec_touched_rows"


def record_touched_rows(table: torch.Tensor, rows: torch.Tensor) -> None:
    """For a lookup that adds its rows' gradient into table.grad itself (genrec.train.sharding): the rows
    (local to the block) this step's gradient may be nonzero in, so that RowSparseAdamW reads those rows
    instead of scanning the whole table for them."""
    recorded = table.__dict__.get(_TOUCHED)
    table.__dict__[_TOUCHED] = rows if recorded is None else torch.cat([recorded, rows])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This worker's rows of a sharded table (a view: writing to it writes the table), or the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def build_optimizer(groups: list[dict], item_tables: list[torch.nn.Parameter], kind: str,
                    **hyper) -> torch.optim.Optimizer:
    """train.embedding_optimizer's optimizer over `groups` (genrec.train.sharding.optimizer_groups)."""
    if kind == "row_sparse_adamw":
        return RowSparseAdamW(groups, item_tables, **hyper)
    optimizer = torch.optim.AdamW(groups, **hyper)
    optimizer.register_step_post_hook(_forget_touched_rows)  # it updates every row: the record is not needed
    return optimizer


def lr_factor(step: int, total_steps: int, schedule: LrSchedule) -> float:
    """The share of train.lr that optimizer step `step` (0-based, of `total_steps` in the run) takes under
    train.lr_schedule: 1 throughout when constant; else (step + 1) / warmup_steps during the warmup, then a
    cosine or linear decay from 1 (the first step after the warmup) to final_lr_fraction (the last step)."""
    if schedule.kind == "constant":
        return 1.0
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    decay_steps = total_steps - 1 - schedule.warmup_steps
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    final = schedule.final_lr_fraction
    if schedule.kind == "warmup_linear":
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_scheduled_lr(optimizer: torch.optim.Optimizer, lr: float, step: int, total_steps: int,
                     schedule: LrSchedule) -> float:
    """Every group's lr for optimizer step `step`: train.lr (`lr`) x lr_factor; returns it."""
    scheduled = lr * lr_factor(step, total_steps, schedule)
    for group in optimizer.param_groups:
        group["lr"] = scheduled
    return scheduled


@torch.no_grad()
def grow_optimizer_rows(optimizer: torch.optim.Optimizer,
                        replaced: list[tuple[torch.nn.Parameter, torch.nn.Parameter]]) -> None:
    """After a table grew (genrec.model.growth.grow_item_tables, which returns the (old, new) parameters):
    the optimizer steps the new parameter in the old one's place, with the old rows' moments as they were,
    zero moments for the new rows (as a row never touched has) and the table's step count kept. Its state
    dict then loads into the optimizer of a model built with the grown table."""
    for old, new in replaced:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, {})
        if state:
            optimizer.state[new] = {key: _grown(value, old, new) for key, value in state.items()}
        if isinstance(optimizer, RowSparseAdamW) and id(old) in optimizer.row_sparse:
            optimizer.row_sparse = (optimizer.row_sparse - {id(old)}) | {id(new)}
            optimizer._updated_rows.pop(id(old), None)  # rows of the old gradient buffer, gone with it


def _grown(value, old: torch.Tensor, new: torch.Tensor):
    """A per-element state tensor (exp_avg, exp_avg_sq, max_exp_avg_sq) with zero rows for the new rows;
    anything else (the step count) as it is."""
    if not isinstance(value, torch.Tensor) or value.shape != old.shape:
        return value
    return torch.cat([value, value.new_zeros(new.size(0) - old.size(0), *value.shape[1:])])


def _forget_touched_rows(optimizer: torch.optim.Optimizer, *_) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.__dict__.pop(_TOUCHED, None)
