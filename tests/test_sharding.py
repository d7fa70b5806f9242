"""Row-wise sharded item tables (model.embedding_sharding, genrec.train.sharding): the lookup, its gradient,
the loss against a whole table and the checkpoints, in real gloo processes. Whole sharded runs under Ray
Train: tests/test_train.py (2 -> 1 workers, a killed run), test_generative.py (gr, dlrm), test_streaming.py."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.tensor import DTensor

from genrec.config import ExperimentConfig
from genrec.model import sampled_softmax_loss
from genrec.train.checkpoint import Progress, restore, save_checkpoint
from genrec.train.optim import RowSparseAdamW
from genrec.train.evaluation import full_ranks
from genrec.train.sharding import (RowWiseEmbedding, batch_item_table, full_state_dict, item_table_bytes,
                                   local_catalog, optimizer_groups, resolve_sharding, shard_item_tables)

V, D = 37, 8  # 38 rows: blocks of 19 on 2 workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leave():
    """Every worker reaches this point before any closes its gloo connections: a worker that leaves while
    its peer still reads the last collective's messages can abort the peer on exit ("terminate called
    without an active exception", seen once in CI)."""
    dist.barrier()
    dist.destroy_process_group()


class _Items(nn.Module):
    """The smallest model with an item table where the encoders keep theirs (embedding.items)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Module()
        self.embedding.items = nn.Embedding(V + 1, D, padding_idx=0)
        self.dense = nn.Linear(D, D)

    def forward(self, ids):
        return self.dense(self.embedding.items(ids))


def _optimizer(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5)
    table = model.embedding.items.weight
    return RowSparseAdamW(optimizer_groups(model, ["embedding.items.weight"]), [table], lr=0.1, weight_decay=0.1)


def _steps(model, batches, world, rank, kind="sgd"):
    """Five steps (SGD, or RowSparseAdamW for the table) of the sampled softmax, each worker on its slice
    of the global batch; the loss as the training loop scales it (sum over my targets / global count x world)."""
    optimizer = _optimizer(model, kind)
    losses = []
    for history, targets, negatives in batches:
        mine = slice(rank * len(targets) // world, (rank + 1) * len(targets) // world)
        users = torch.nn.functional.normalize(model(history[mine]), dim=-1)
        if isinstance(model.embedding.items, RowWiseEmbedding):
            items, t, n = batch_item_table(model, targets[mine], negatives[mine])
        else:
            items, t, n = model.embedding.items.weight, targets[mine], negatives[mine]
            items = torch.nn.functional.normalize(items, dim=-1, eps=1e-6)
        loss = sampled_softmax_loss(users, t, items, n, normalizer=len(targets) / world)
        optimizer.zero_grad()
        loss.backward()
        if world > 1:
            for p in model.dense.parameters():  # what DDP does for the dense layers
                dist.all_reduce(p.grad)
                p.grad /= world
        optimizer.step()
        total = loss.detach() / world
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total))
    return losses


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(1, V + 1, (6,), generator=g), torch.randint(1, V + 1, (6,), generator=g),
             torch.randint(1, V + 1, (6, 5), generator=g)) for _ in range(5)]


def _worker(rank, world, port, out, kind):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _Items()
    whole = model.embedding.items.weight.detach().clone()
    shard_item_tables(model, world, torch.device("cpu"))
    model.to(torch.device("cpu"))  # as Ray Train's prepare_model moves it (a DTensor parameter is swapped)
    table = model.embedding.items
    ids = torch.tensor([[0, 5, 37], [19, 18, 5]]) if rank == 0 else torch.tensor([[1, 2, 3]])  # other sizes per rank
    assert torch.equal(table(ids), torch.where(ids.unsqueeze(-1) > 0, whole[ids], 0.0))
    assert table.weight.to_local().shape == (19, D)
    losses = _steps(model, _batches(), world, rank, kind)
    state = full_state_dict(model, rank)
    if rank == 0:
        out.put((losses, {k: v.numpy() for k, v in state.items()}))  # by value: this process ends first
    _leave()


@pytest.mark.parametrize("kind", ["sgd", "row_sparse_adamw"])
def test_two_row_wise_workers_take_the_steps_of_one_whole_table(kind):
    """Same seeds, batches and negatives: 5 steps on 2 workers with the table split row-wise give the
    losses (fp32, to 1e-6) and weights (to 1e-5: sums in another order) of one worker with the whole table;
    with RowSparseAdamW each block updates its touched rows as the whole table does."""
    reference = _Items()
    expected = _steps(reference, _batches(), 1, 0, kind)
    context = mp.get_context("spawn")
    out, port = context.Queue(), _free_port()
    processes = [context.Process(target=_worker, args=(rank, 2, port, out, kind)) for rank in range(2)]
    for p in processes:
        p.start()
    losses, state = out.get(timeout=120)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert losses == pytest.approx(expected, rel=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(state[key]), value, rtol=1e-5, atol=1e-5)
    assert not state["embedding.items.weight"][0].any()  # padding row: never trained


def _checkpoint_worker(rank, world, port, folder, out):
    """Phase 1 (world 1): 3 AdamW steps, then a checkpoint. Phase 2 (world 2): restore it; rank 0 sends
    the whole model and optimizer state of both phases."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _Items()
    names = shard_item_tables(model, world, torch.device("cpu"))
    optimizer = torch.optim.AdamW(optimizer_groups(model, names), lr=0.1)
    if world == 1:
        for step in range(3):
            model(torch.arange(step, V + 1)).square().sum().backward()
            optimizer.step()
        save_checkpoint(folder, model, optimizer, Progress(best_state={}), rank, sharded=True)
    else:
        restore(folder, model, optimizer, {"lr": 0.1}, rank)

    def whole(value):
        return (value.full_tensor() if isinstance(value, DTensor) else value).detach().numpy().copy()

    state = {n: whole(p) for n, p in model.named_parameters()}
    state.update({f"{n}.{k}": whole(v) for n, p in model.named_parameters() for k, v in optimizer.state[p].items()})
    if rank == 0:
        out.put(state)
    _leave()


def test_checkpoint_saved_by_one_worker_resumes_on_two(tmp_path):
    """torch.distributed.checkpoint re-shards the table and its AdamW moments for another worker count."""
    context = mp.get_context("spawn")
    out = context.Queue()
    states = []
    for world in (1, 2):
        port = _free_port()
        processes = [context.Process(target=_checkpoint_worker, args=(rank, world, port, tmp_path, out))
                     for rank in range(world)]
        for p in processes:
            p.start()
        states.append(out.get(timeout=120))
        for p in processes:
            p.join(timeout=60)
            assert p.exitcode == 0
    saved, restored = states
    assert saved.keys() == restored.keys() and "embedding.items.weight.exp_avg_sq" in saved
    for key in saved:
        assert (saved[key] == restored[key]).all(), key


def _ranking_worker(rank, world, port, out):
    """Each worker ranks the same queries against its block (local_catalog); the summed ranks must be the
    whole table's, for both tie policies, with history exclusions and item blocks smaller than a block."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _Items()
    with torch.no_grad():
        model.embedding.items.weight[30] = model.embedding.items.weight[5]  # a tie across the two blocks
    whole = torch.nn.functional.normalize(model.embedding.items.weight.detach(), dim=-1, eps=1e-6)
    shard_item_tables(model, world, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(9, D, generator=g)
    queries[0] = whole[5]  # its target 30 ties with item 5
    targets = torch.tensor([30, 1, 18, 19, 37, 5, 2, 25, 11])
    history, history_rows = torch.tensor([7, 3, 20, 37, 19]), torch.tensor([0, 1, 1, 4, 4])
    with torch.no_grad():
        catalog = local_catalog(model)
    results = []
    for ties in ("pessimistic", "optimistic"):
        expected = full_ranks(queries, targets, whole, history, history_rows, ties=ties)
        ranks = full_ranks(queries, targets, history=history, history_rows=history_rows, item_block=7, ties=ties,
                           **catalog)
        results.append((expected.tolist(), ranks.tolist()))
    if rank == 0:
        out.put(results)
    _leave()


def test_ranking_spread_over_blocks_equals_the_whole_table():
    context = mp.get_context("spawn")
    out, port = context.Queue(), _free_port()
    processes = [context.Process(target=_ranking_worker, args=(rank, 2, port, out)) for rank in range(2)]
    for p in processes:
        p.start()
    results = out.get(timeout=120)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    (pessimistic, pessimistic_spread), (optimistic, optimistic_spread) = results
    assert pessimistic_spread == pessimistic and optimistic_spread == optimistic
    assert (optimistic[0], pessimistic[0]) == (1, 2)  # query 0 is item 5, which ties with its target 30 (other block)


def test_batch_table_loss_equals_whole_table_loss():
    """The renumbered table of the batch's candidates gives the loss of the whole table, accidental hits
    (a negative equal to the target) masked the same."""
    model = _Items().requires_grad_(False)
    users = torch.nn.functional.normalize(torch.randn(4, D), dim=-1)
    targets = torch.tensor([3, 0, 9, 9])
    negatives = torch.tensor([[3, 4, 30], [9, 9, 1], [2, 9, 2]])  # a hit in rows 0 and 2
    whole = torch.nn.functional.normalize(model.embedding.items.weight, dim=-1, eps=1e-6)
    expected = sampled_softmax_loss(users, targets, whole, negatives)
    items, t, n = batch_item_table(model, targets, negatives)
    assert items.shape == (1 + len({3, 9, 4, 30, 1, 2}), D) and t[1] == 0
    assert float(sampled_softmax_loss(users, t, items, n)) == pytest.approx(float(expected), rel=1e-6)


def test_auto_sharding_follows_the_table_size(tmp_path):
    data = {"source": {"kind": "synthetic", "path": str(tmp_path / "raw")}, "output_dir": str(tmp_path / "data")}
    cfg = ExperimentConfig.model_validate({"name": "x", "data": data, "train": {"num_workers": 2},
                                           "model": {"dim": 64, "embedding_sharding": "auto"}})
    table = item_table_bytes(1_000_000, 64)
    assert table == 1_000_001 * 64 * 16
    assert resolve_sharding(cfg, 1_000_000, memory_per_worker=4 * table) == "replicated"  # 25%: fits
    assert resolve_sharding(cfg, 1_000_000, memory_per_worker=3 * table) == "row_wise"
    one = cfg.model_copy(deep=True)
    one.train.num_workers = 1
    assert resolve_sharding(one, 1_000_000, memory_per_worker=table) == "replicated"  # nobody to share with
    with pytest.raises(ValueError, match="embedding_sharding"):
        ExperimentConfig.model_validate({"name": "x", "data": data, "model": {"embedding_sharding": "column_wise"}})
