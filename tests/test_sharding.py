"""Row-wise sharded item tables (model.embedding_sharding, genrec.train.sharding): the lookup, its gradient
and the loss against a whole table, in two real gloo processes; then whole runs on a real local Ray
cluster: 2 workers row-wise train the model 1 replicated worker trains, a run resumes on 1 worker, and
the registered model evaluates as a replicated one does."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.tensor import DTensor

from genrec.config import ConfigError, ExperimentConfig
from genrec.model import sampled_softmax_loss
from genrec.train.checkpoint import Progress, restore, save_checkpoint
from genrec.train.sharding import (RowWiseEmbedding, batch_item_table, full_state_dict, item_table_bytes,
                                   optimizer_groups, resolve_sharding, shard_item_tables)

V, D = 37, 8  # 38 rows: blocks of 19 on 2 workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _steps(model, batches, world, rank):
    """Five SGD steps of the sampled softmax, each worker on its slice of the global batch; the loss as
    the training loop scales it (sum over my targets / global count x world)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
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


def _worker(rank, world, port, out):
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
    losses = _steps(model, _batches(), world, rank)
    state = full_state_dict(model, rank)
    if rank == 0:
        out.put((losses, {k: v.numpy() for k, v in state.items()}))  # by value: this process ends first
    dist.destroy_process_group()


def test_two_row_wise_workers_take_the_steps_of_one_whole_table():
    """Same seeds, batches and negatives: 5 steps on 2 workers with the table split row-wise give the
    losses (fp32, to 1e-6) and weights (to 1e-5: sums in another order) of one worker with the whole table."""
    reference = _Items()
    expected = _steps(reference, _batches(), 1, 0)
    context = mp.get_context("spawn")
    out, port = context.Queue(), _free_port()
    processes = [context.Process(target=_worker, args=(rank, 2, port, out)) for rank in range(2)]
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
    dist.destroy_process_group()


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


# ----------------------------------------------------------------------------- whole runs on Ray


@pytest.fixture(scope="module")
def tiny(ray_cluster, tmp_path_factory):
    from genrec.data.pipeline import prepare

    root = tmp_path_factory.mktemp("sharding")
    cfg = ExperimentConfig.model_validate({
        "name": "sharded",
        "data": {"source": {"kind": "synthetic", "num_users": 200, "num_items": 301, "mean_events_per_user": 16,
                            "num_shards": 2, "path": str(root / "raw")},
                 "output_dir": str(root / "data"), "num_partitions": 2},
        "model": {"kind": "hstu", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0, "max_seq_len": 16},
        "train": {"epochs": 3, "batch_size": 40, "num_negatives": 16, "storage_path": str(root / "runs"),
                  "cpus_per_worker": 0.5, "threads_per_worker": 1, "seed": 5},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
    })
    prepare(cfg.data, log=lambda *_: None)
    return cfg


def _variant(cfg, run_name, sharding, **train):
    out = cfg.model_copy(deep=True)
    out.model.embedding_sharding = sharding
    out.train = out.train.model_copy(update={"run_name": run_name, **train})
    return out


def _curve(result):
    return [h["train/loss"] for h in result["history"]]


def test_row_wise_runs_train_resume_on_one_worker_and_register_the_same_model(tiny):
    """2 workers row-wise = 1 replicated worker, epoch by epoch; the sharded run resumed on 1 worker ends
    where the uninterrupted replicated run ends; its registered model (whole tables) evaluates to the
    metrics the live run reported. (1 -> 2 workers: test_checkpoint_saved_by_one_worker_resumes_on_two.)"""
    from genrec.train.trainer import evaluate_model, fit  # here: the spawned workers above import this module

    cfg = tiny
    reference = fit(_variant(cfg, "replicated", "replicated", num_workers=1, epochs=2), log=lambda *_: None)
    lines = []
    first = fit(_variant(cfg, "row-wise", "row_wise", num_workers=2, epochs=1), log=lines.append)
    assert any("2 worker(s), item table row-wise over the workers" in line for line in lines)
    assert _curve(first) == pytest.approx(_curve(reference)[:1], rel=1e-5)
    resumed = fit(_variant(cfg, "row-wise", "row_wise", num_workers=1, epochs=2), log=lambda *_: None)  # 2 -> 1
    assert _curve(resumed)[:1] == _curve(first)
    assert _curve(resumed) == pytest.approx(_curve(reference), rel=1e-5)
    assert resumed["best"] == pytest.approx(reference["best"], rel=1e-4)
    # the registered artifact is an ordinary model: whole tables, loaded and evaluated as any other
    uri = f"models:/{resumed['registered_model']}/{resumed['version']}"
    metrics = evaluate_model(cfg, uri, "test")
    assert metrics["ndcg@10"] == pytest.approx(resumed["best"]["test/ndcg@10"], rel=1e-5)
    # switching a run's sharding is refused before any worker starts, naming the key
    with pytest.raises(ConfigError, match=r"changed: model\.embedding_sharding"):
        fit(_variant(cfg, "row-wise", "replicated", num_workers=1, epochs=3), log=lambda *_: None)
