"""Row-wise sharded item tables: the catalog a run trains on is bounded by the workers' memory together,
not by one worker's (model.embedding_sharding).

Applied around the model, not inside it: `shard_item_tables` swaps a built model's item table for a
`RowWiseEmbedding` that keeps only this worker's block of rows (a DTensor, Shard(0), so AdamW keeps its
state for those rows only and torch.distributed.checkpoint saves and re-shards it), and the training
loop scores its sampled softmax against a table of the batch's own candidates (`batch_item_table`)
instead of the whole catalog. Dense layers stay data-parallel (DDP ignores the sharded tables).

A lookup is the pattern of DTensor's own row-wise embedding: every worker's ids are gathered, each
worker looks up the rows it owns, and a reduce-scatter returns each worker the rows of its ids. DTensor's
op is not used as such because its backward makes a full-size (replicated) gradient of the table on
every worker, which is the memory this exists to save; here, the collectives are torch's functional
ones (autograd-aware), so each worker's gradient covers its own rows only.

Evaluation, the best model and the registered artifact are unchanged: `full_state_dict` gathers the
tables on rank 0, which holds one full table (4 bytes x D per item) while training needs the weight,
its gradient and two AdamW moments (16 bytes x D per item), now divided by the number of workers.
"""

from __future__ import annotations

import psutil
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..config import ExperimentConfig
from ..model.encoder import L2_NORM_EPS
from ..model.growth import ITEM_TABLES
from .optim import record_touched_rows

# Bytes per table entry while training: the fp32 weight, its gradient and AdamW's two moments.
TRAINING_BYTES_PER_ENTRY = 16


class RowWiseEmbedding(nn.Module):
    """An item table (row 0 = padding) whose rows are split over the workers of `mesh` in contiguous
    blocks (torch.chunk's split, as DTensor's Shard(0)). forward(ids) is a collective: every worker of
    the mesh calls it the same number of times, in the same order."""

    def __init__(self, table: nn.Embedding, mesh: DeviceMesh, gradient_scale: float) -> None:
        """table: the model's full table (every worker built the same one from the same seed: each keeps
        its block, no communication). gradient_scale: multiplies the table's gradient (see shard_item_tables)."""
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.weight.shape
        self.mesh = mesh
        self.weight = nn.Parameter(distribute_tensor(table.weight.detach(), mesh, [Shard(0)], src_data_rank=None))
        self.block = -(-self.num_embeddings // mesh.size())  # rows per worker (the last may hold fewer)
        self.first_row = mesh.get_local_rank() * self.block
        # applied in forward, not as a hook on the parameter: moving the module (DDP's prepare_model does)
        # swaps a DTensor parameter's contents, and a hook registered on it before is lost
        self.gradient_scale = gradient_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[...] ids -> [..., D] rows (id 0, the padding, is a zero row and gets no gradient)."""
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        longest = torch.tensor([unique.numel()], device=ids.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.mesh.get_group())
        padded = F.pad(unique, (0, int(longest) - unique.numel()))  # equal sizes for the collectives
        every = funcol.all_gather_single(padded, 0, self.mesh)  # [workers x longest]
        local = every - self.first_row
        mine = (local >= 0) & (local < self.weight.to_local().size(0)) & (every > 0)
        rows = _OwnedRows.apply(self.weight, torch.where(mine, local, 0), mine) * mine.unsqueeze(1)
        rows = _ScaledGradient.apply(rows, self.gradient_scale)
        rows = funcol.reduce_scatter_single(rows, "sum", 0, self.mesh)  # [longest, D]: the rows of my ids
        return rows[: unique.numel()][inverse].view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, row-wise over {self.mesh.size()} workers"


class _OwnedRows(torch.autograd.Function):
    """block[index] of a Shard(0) table, whose backward adds the rows' gradient into the table's .grad in
    place (allocating it, zero, when there is none) instead of returning a gradient the size of the block
    for autograd to allocate, fill and add to the last one: with two lookups a step (the history and the
    sampled softmax's candidates) that was five passes over the block per step, whatever the batch."""

    @staticmethod
    def forward(ctx, weight: DTensor, index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        """index: rows of this worker's block; owned: which of them are real lookups (the rest are masked)."""
        ctx.weight = weight
        ctx.save_for_backward(index, owned)
        return weight.to_local()[index]

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        index, owned = ctx.saved_tensors
        weight = ctx.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.to_local().index_add_(0, index, gradient)
        record_touched_rows(weight, index[owned])  # RowSparseAdamW reads these rows, not the whole block
        return None, None, None


class _ScaledGradient(torch.autograd.Function):
    """Identity on the way forward; the gradient times `scale` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        return gradient * ctx.scale, None


def item_table_names(model: nn.Module) -> list[str]:
    """The dotted names of the model's item tables (see ITEM_TABLES)."""
    names = dict(model.named_modules())
    return [name for name in ITEM_TABLES if isinstance(names.get(name), (nn.Embedding, RowWiseEmbedding))]


def item_table_bytes(num_items: int, dim: int) -> int:
    """Training memory of one item table of V items with its AdamW state (row 0 is padding)."""
    return (num_items + 1) * dim * TRAINING_BYTES_PER_ENTRY


def resolve_sharding(cfg: ExperimentConfig, num_items: int, memory_per_worker: float | None = None) -> str:
    """model.embedding_sharding as it applies to this run: "auto" is row_wise when the item table and
    its AdamW state would take more than model.embedding_memory_share of a worker's memory
    (train.memory_per_worker_gb, else this machine's memory / train.num_workers) and there are two
    workers or more to share it; else replicated."""
    m, t = cfg.model, cfg.train
    if m.embedding_sharding != "auto":
        return m.embedding_sharding
    if t.num_workers < 2:
        return "replicated"
    if memory_per_worker is None:
        memory_per_worker = t.memory_per_worker_gb * 2**30 if t.memory_per_worker_gb \
            else psutil.virtual_memory().total / t.num_workers
    fits = item_table_bytes(num_items, m.dim) <= m.embedding_memory_share * memory_per_worker
    return "replicated" if fits else "row_wise"


def shard_item_tables(model: nn.Module, world: int, device: torch.device) -> list[str]:
    """Swap the model's item tables for RowWiseEmbedding over all `world` workers (a collective: every
    worker calls it, after the same seeded build). Returns the sharded parameters' names, which DDP is
    told to leave alone. DDP averages the dense gradients over workers (each worker's loss is scaled
    by the world size, see loop.py); a table row's gradient instead arrives summed over every worker
    that looked it up, so it is divided by the world size here to be the same average."""
    mesh = init_device_mesh(device.type, (world,))
    names = []
    for name in item_table_names(model):
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, RowWiseEmbedding(getattr(parent, attribute), mesh, 1.0 / world))
        names.append(f"{name}.weight")
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(module, RowWiseEmbedding) for module in model.modules())


def full_state_dict(model: nn.Module, rank: int) -> dict | None:
    """The model's state dict with whole tables, on rank 0 (None elsewhere): a collective when the model
    is sharded (each table is gathered block by block), a copy of the state otherwise."""
    state = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            state[key] = _gather_rows(value, rank)
        elif rank == 0:
            state[key] = value.detach().cpu().clone()
    return state if rank == 0 else None


def _gather_rows(table: DTensor, rank: int) -> torch.Tensor | None:
    """The whole of a Shard(0) table on rank 0 (gloo's gather wants equal blocks: the last is padded)."""
    mesh, local = table.device_mesh, table.to_local().detach()
    block = -(-table.size(0) // mesh.size())
    padded = F.pad(local, (0, 0, 0, block - local.size(0)))
    whole = padded.new_empty(block * mesh.size(), table.size(1)) if rank == 0 else None  # on the workers' device
    dist.gather(padded, list(whole.chunk(mesh.size())) if rank == 0 else None, dst=0, group=mesh.get_group())
    return whole[: table.size(0)].cpu() if rank == 0 else None


def local_catalog(model: nn.Module) -> dict:
    """This worker's block of the model's sharded item table, L2-normalised, as full_ranks ranks against
    it (genrec.train.evaluation.evaluate's catalog): every worker ranks the same queries against its own
    rows and the workers' counts are summed, so the ranking is spread over the workers and the whole
    table is never gathered."""
    table = model.get_submodule(item_table_names(model)[0])
    group = table.mesh.get_group()

    def sum_over_workers(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=group)
        return tensor

    return {"items": F.normalize(table.weight.to_local(), dim=-1, eps=L2_NORM_EPS), "first_id": table.first_row,
            "total_rows": table.num_embeddings, "sum_over_workers": sum_over_workers}


def optimizer_groups(model: nn.Module, sharded: list[str]) -> list[dict]:
    """AdamW's parameter groups: the sharded tables in a group of their own (a group's foreach update,
    the default on CUDA, takes DTensors or plain tensors, not both)."""
    groups = [[p for n, p in model.named_parameters() if (n in sharded) == own] for own in (False, True)]
    return [{"params": group} for group in groups if group]


def scoring_items(model: nn.Module, sharded: bool, target_ids: torch.Tensor, negative_ids: torch.Tensor):
    """What the sampled softmax scores against: (items, target_ids, negative_ids) as sampled_softmax_loss
    takes them; the whole L2-normalised table, or, sharded, the batch's table (batch_item_table)."""
    if sharded:
        return batch_item_table(model, target_ids, negative_ids)
    return model.all_item_embeddings(), target_ids, negative_ids


def batch_item_table(model: nn.Module, target_ids: torch.Tensor, negative_ids: torch.Tensor):
    """The sampled softmax's view of a sharded catalog: (the L2-normalised rows of this batch's targets
    and negatives [U + 1, D], row 0 zero; target_ids and negative_ids renumbered into it). The loss on
    it equals the loss on the whole table (the renumbering keeps equal ids equal, so accidental hits
    are masked the same); every worker calls it once per step, whatever its batch holds."""
    table = model.get_submodule(item_table_names(model)[0])
    candidates = torch.cat([target_ids[target_ids > 0], negative_ids.reshape(-1)])
    unique = torch.unique(candidates)
    rows = F.normalize(table(unique), dim=-1, eps=L2_NORM_EPS)
    vectors = torch.cat([rows.new_zeros(1, rows.size(1)), rows])

    def renumber(ids: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(unique, ids) + 1

    targets = torch.where(target_ids > 0, renumber(target_ids.clamp(min=1)), 0)
    return vectors, targets, renumber(negative_ids)

