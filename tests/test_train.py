"""Training on a real local Ray cluster with a real sqlite MLflow store: tracking, registry,
resume, fault tolerance (checkpoints and run folders on a real S3 API server, tests/s3server.py, or a
local folder), distributed equivalence, non-finite loss, and the metrics."""

import math
import threading
import time
import uuid

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from s3server import BUCKET

from genrec.config import ConfigError, ExperimentConfig, SweepConfig
from genrec.data.pipeline import prepare
from genrec.metrics import metrics_from_ranks
from genrec.train.evaluation import full_ranks
from genrec.storage import StorageError
from genrec.train.sweep import run_sweep
from genrec.train.trainer import evaluate_model, fit


def test_full_ranking_metrics_by_hand():
    # 6 items (ids 1..5, 0 = padding); scores of the single user = the item's x coordinate
    items = torch.tensor([[9.0, 0], [0.5, 0], [0.9, 0], [0.1, 0], [0.7, 0], [0.3, 0]])
    query = torch.tensor([[1.0, 0]])
    # target 4 (score 0.7): items 2 (0.9) rank above it -> rank 2; padding never counts
    ranks = full_ranks(query, torch.tensor([4]), items, history=torch.tensor([], dtype=torch.long),
                       history_rows=torch.tensor([], dtype=torch.long))
    assert ranks.tolist() == [2]
    # item 2 in the history is removed from ranking -> rank 1; a history item equal to the target stays
    ranks = full_ranks(query, torch.tensor([4]), items, history=torch.tensor([2, 4]), history_rows=torch.tensor([0, 0]))
    assert ranks.tolist() == [1]
    # item blocks smaller than the catalog give the same ranks
    ranks = full_ranks(query.repeat(2, 1), torch.tensor([5, 3]), items, torch.tensor([1]), torch.tensor([1]), item_block=2)
    assert ranks.tolist() == [4, 4]  # 0.1 < 0.3 < 0.5 < 0.7 < 0.9; item 1 removed for row 1
    m = metrics_from_ranks(torch.tensor([1, 4, 20, 300]))
    assert m["hr@10"] == 0.5 and m["hr@50"] == 0.75 and m["hr@200"] == 0.75
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["ndcg@200"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(21)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 20 + 1 / 300) / 4)


@pytest.fixture(scope="module")
def tiny(ray_cluster, tmp_path_factory):
    """A prepared synthetic dataset and a tiny model config that trains in seconds."""
    root = tmp_path_factory.mktemp("train")
    cfg = ExperimentConfig.model_validate({
        "name": "tiny",
        "data": {"source": {"kind": "synthetic", "num_users": 240, "num_items": 120, "mean_events_per_user": 20,
                            "num_shards": 2, "path": str(root / "raw")},
                 "output_dir": str(root / "data"), "num_partitions": 2},
        "model": {"kind": "hstu", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0, "max_seq_len": 16},
        "train": {"epochs": 3, "batch_size": 32, "num_negatives": 16, "storage_path": str(root / "runs"),
                  "cpus_per_worker": 0.5, "threads_per_worker": 1, "seed": 3},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
    })
    prepare(cfg.data, log=lambda *_: None)
    return cfg, root


def variant(cfg, run_name, **train):
    out = cfg.model_copy(deep=True)
    out.train = out.train.model_copy(update={"run_name": run_name, **train})
    return out


def curve(result):
    return [h["train/loss"] for h in result["history"]]


def s3_runs(name: str) -> tuple[str, str]:
    """(a fresh key prefix for a test's runs, its s3:// URI) on the tests' S3 API server."""
    prefix = f"train-{name}-{uuid.uuid4().hex[:8]}/runs"
    return prefix, f"s3://{BUCKET}/{prefix}"


def keys(s3, prefix: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"].removeprefix(prefix) for item in listed.get("Contents", [])]


def test_fit_tracks_registers_and_resumes(tiny, s3):
    """With the checkpoints and the run folder on object storage (a real S3 API server), as on a cluster
    whose nodes share no disk."""
    cfg, _ = tiny
    prefix, storage = s3_runs("tracked")
    cfg = variant(cfg, None, storage_path=storage)
    lines = []
    result = fit(variant(cfg, "tracked", epochs=2), log=lines.append)
    # the workers' progress lines reach the driver's log through the progress object on s3
    assert [line.split(" loss ")[0] for line in lines if line.startswith("[train] epoch ")] == \
        ["[train] epoch 1/2", "[train] epoch 2/2"]
    stored = keys(s3, f"{prefix}/tracked/")
    checkpoints = {key.split("/")[0] for key in stored if key.startswith("checkpoint_") and "/" in key}
    assert len(checkpoints) == 2 and all(f"{c}/state.pt" in stored for c in checkpoints)
    assert {"progress.log", "model_shape.json", "training_curves.png"} <= set(stored)
    assert result["checkpoint"].startswith(f"{storage}/tracked/checkpoint_")
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["model.kind"] == "hstu" and run.data.params["train.batch_size"] == "32"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2] and losses[1].value < losses[0].value
    assert len(client.get_metric_history(run.info.run_id, "valid/ndcg_at_10")) == 2
    version = client.get_model_version("tiny", result["version"])
    assert version.run_id == run.info.run_id
    assert float(version.tags["test/ndcg_at_10"]) == pytest.approx(result["best"]["test/ndcg@10"], abs=1e-4)
    assert "training_curves.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # the registered model loads (weights_only) and reproduces the test metrics it was registered with
    metrics = evaluate_model(cfg, f"models:/tiny/{result['version']}", "test")
    assert metrics["ndcg@10"] == pytest.approx(result["best"]["test/ndcg@10"], rel=1e-5)
    assert metrics["count"] == 240
    # re-submitting the same run name with more epochs resumes from s3: same MLflow run, epochs 1-2 not redone
    again = []
    resumed = fit(variant(cfg, "tracked", epochs=3), log=again.append)
    assert resumed["mlflow_run_id"] == run.info.run_id
    assert curve(resumed)[:2] == curve(result) and len(curve(resumed)) == 3
    assert "[train] resumed from checkpoint after epoch 2" in again
    assert [line.split(" loss ")[0] for line in again if line.startswith("[train] epoch ")] == ["[train] epoch 3/3"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    # another attention kernel (a CPU run resumed on a GPU) is the same model: it resumes
    other_kernel = variant(cfg, "tracked", epochs=4)
    other_kernel.model = other_kernel.model.model_copy(update={"attention_impl": "pytorch"})
    assert curve(fit(other_kernel, log=lambda *_: None))[:3] == curve(resumed)
    # the same run name with a differently shaped model is refused before any worker starts, naming the key
    reshaped = variant(cfg, "tracked", epochs=5)
    reshaped.model = reshaped.model.model_copy(update={"max_seq_len": cfg.model.max_seq_len + 8})
    with pytest.raises(ConfigError, match=r"'tracked'.*changed: model\.max_seq_len\b.*train\.run_name"):
        fit(reshaped, log=lambda *_: None)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def one_worker_run(tiny):
    """An uninterrupted 8-epoch run of one worker with local storage: the reference of the distributed and
    the killed runs (each training run costs seconds of process start-up, so it is trained once)."""
    cfg, _ = tiny
    return fit(variant(cfg, "uninterrupted-local", num_workers=1, epochs=8), log=lambda *_: None)


def test_two_workers_match_one_worker(tiny, one_worker_run):
    cfg, _ = tiny
    epochs = cfg.train.epochs  # the reference's first epochs: a run's epochs do not depend on how many follow
    one = one_worker_run["history"][:epochs]
    two = fit(variant(cfg, "two-workers", num_workers=2), log=lambda *_: None)
    assert [h["train/loss"] for h in one] == pytest.approx(curve(two), rel=1e-4)
    assert max(h["valid/ndcg@10"] for h in one) == pytest.approx(two["best"]["valid/ndcg@10"], rel=1e-3)


def _train_workers():
    """Training worker processes of this test session's Ray cluster (its processes descend from ours)."""
    return [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


def test_killed_worker_restarts_from_its_s3_checkpoint_with_the_local_runs_curve(tiny, s3, one_worker_run):
    """Killed mid-run, the workers restart from the last checkpoint in the bucket; the run ends with the
    curve of an uninterrupted run whose storage is a local folder (so s3 and local storage also agree).
    The killed run has 2 workers with the item table split row-wise (model.embedding_sharding), the
    reference 1 worker with the whole table: the sharded checkpoints restore the same model."""
    cfg, _ = tiny
    reference = one_worker_run
    epochs = len(reference["history"])
    prefix, storage = s3_runs("chaos")
    outcome = {}
    chaos = variant(cfg, "chaos", epochs=epochs, storage_path=storage, num_workers=2)
    chaos.model.embedding_sharding = "row_wise"
    thread = threading.Thread(target=lambda: outcome.update(fit(chaos, log=lambda *_: None)))
    thread.start()
    deadline = time.time() + 240
    while not keys(s3, f"{prefix}/chaos/checkpoint_") and time.time() < deadline:
        time.sleep(0.05)
    victims = _train_workers()
    assert victims and thread.is_alive(), "the run must still be training when its worker is killed"
    for p in victims:
        p.kill()
    thread.join(timeout=600)
    assert outcome, "the run did not complete after the worker was killed"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in victims)
    assert len(curve(outcome)) == epochs
    assert curve(outcome) == pytest.approx(curve(reference), rel=1e-6)
    assert outcome["best"] == pytest.approx(reference["best"], rel=1e-6)


def test_unusable_storage_is_refused_in_one_line_naming_the_key(tiny, s3, monkeypatch):
    cfg, _ = tiny
    with pytest.raises(StorageError, match=r"^train\.storage_path=s3://genrec-no-such-bucket/runs: the bucket "
                                           r"'genrec-no-such-bucket' does not exist"):
        fit(variant(cfg, "nowhere", storage_path="s3://genrec-no-such-bucket/runs"), log=lambda *_: None)
    sweep = cfg.model_copy(deep=True)
    sweep.sweep = SweepConfig(families={"hstu": {}}, storage_path="s3://genrec-no-such-bucket/sweeps")
    with pytest.raises(StorageError, match=r"^sweep\.storage_path=s3://genrec-no-such-bucket/sweeps: the bucket"):
        run_sweep(sweep, log=lambda *_: None)
    _, storage = s3_runs("read-only")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.reader[0])  # keys that may read the bucket, not write it
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.reader[1])
    with pytest.raises(StorageError, match=rf"^train\.storage_path={storage}: access denied"):
        fit(variant(cfg, "read-only", storage_path=storage), log=lambda *_: None)


def test_row_wise_run_resumes_on_one_worker_and_registers_an_ordinary_model(tiny, one_worker_run):
    """Sharded checkpoints written by 2 workers resume on 1 (1 -> 2: tests/test_sharding.py), ending where
    the replicated reference is; the registered model (whole tables) evaluates to the live metrics."""
    cfg, _ = tiny
    sharded = variant(cfg, "row-wise", num_workers=2, epochs=1)
    sharded.model.embedding_sharding = "row_wise"
    lines = []
    first = fit(sharded, log=lines.append)
    assert any("2 worker(s), item table row-wise over the workers" in line for line in lines)
    resumed = fit(variant(sharded, "row-wise", num_workers=1, epochs=2), log=lambda *_: None)
    assert curve(resumed)[:1] == curve(first)
    reference = one_worker_run["history"][:2]
    assert curve(resumed) == pytest.approx([h["train/loss"] for h in reference], rel=1e-5)
    assert [h["valid/ndcg@10"] for h in resumed["history"]] == \
        pytest.approx([h["valid/ndcg@10"] for h in reference], rel=1e-4)
    metrics = evaluate_model(cfg, f"models:/tiny/{resumed['version']}", "test")
    assert metrics["ndcg@10"] == pytest.approx(resumed["best"]["test/ndcg@10"], rel=1e-5)
    # switching a run's sharding is refused before any worker starts, naming the key
    replicated = variant(cfg, "row-wise", epochs=3)
    with pytest.raises(ConfigError, match=r"changed: model\.embedding_sharding"):
        fit(replicated, log=lambda *_: None)


@pytest.fixture(scope="module")
def one_epoch_run(tiny):
    """A one-epoch run, registered: what the artifact test loads, and what the non-finite test continues."""
    cfg, _ = tiny
    return fit(variant(cfg, "one-epoch", epochs=1), log=lambda *_: None)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, one_epoch_run):
    from genrec.train.loop import NonFiniteLossError

    cfg, root = tiny
    good = sorted((root / "runs" / "one-epoch").glob("checkpoint_*"))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2.*Last good checkpoint: epoch 1"):
        fit(variant(cfg, "one-epoch", epochs=3, lr=1e30), log=lambda *_: None)
    assert sorted((root / "runs" / "one-epoch").glob("checkpoint_*")) == good


def test_streaming_data_mode_trains_from_ray_data_shards(tiny):
    cfg, _ = tiny
    result = fit(variant(cfg, "streaming", epochs=2, data_mode="streaming", num_workers=2), log=lambda *_: None)
    losses = curve(result)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0]
    # every training user is seen once per epoch across the two workers' shards
    assert result["history"][0]["train/examples_per_s"] * result["history"][0]["train/epoch_seconds"] == pytest.approx(240)
    # workers holding every CPU would leave none to Ray Data's read tasks: the run would wait forever
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(ConfigError, match=r"train.data_mode='streaming' .* train.cpus_per_worker=1 leave 0 of"):
        fit(variant(cfg, "streaming-no-cpu", data_mode="streaming", num_workers=cpus, cpus_per_worker=1))
    # train.steps_per_epoch: a first look at a large log ends the epoch after that many steps on every worker
    capped = fit(variant(cfg, "streaming-capped", epochs=1, data_mode="streaming", num_workers=2, steps_per_epoch=2),
                 log=lambda *_: None)["history"][0]
    assert capped["train/examples_per_s"] * capped["train/epoch_seconds"] == pytest.approx(2 * cfg.train.batch_size)


def test_a_long_epoch_knows_its_steps_and_says_how_far_it_is(tiny):
    from genrec.train.loop import planned_steps, progress_line

    cfg, _ = tiny
    assert planned_steps(cfg, None) == -(-240 // 32)  # the manifest's training users over the global batch
    assert planned_steps(variant(cfg, None, steps_per_epoch=3), None) == 3
    assert progress_line(0, 2, 8, 6400, 10.0) == "epoch 1: step 2 of 8 (25%), ~640 events/s, epoch ETA 30 s"
    assert progress_line(1, 10, 1000, 1e6, 60.0).endswith("epoch ETA 99 min")


def test_in_batch_negatives_option_reaches_the_training_batches(tiny):
    """train.negatives: in_batch changes what the training loop draws: the negatives of each batch it trains
    on (genrec.train.batching.replicated_batches) come from that batch's own targets, where the default draws
    from the whole catalog (the loss with either is tested in tests/test_model.py)."""
    from genrec.data.prepared import read_split
    from genrec.train.batching import batch_spec, replicated_batches

    cfg, _ = tiny
    table = read_split(cfg.data.output_dir, "train")
    drawn = {}
    for in_batch in (False, True):
        run = variant(cfg, None, negatives="in_batch" if in_batch else "uniform")
        batches = list(replicated_batches(table, batch_spec(run, training=True), run, epoch=0, rank=0, world=1))
        for batch, negatives in batches:
            targets = set(batch["target_ids"][batch["target_ids"] > 0].tolist())
            assert negatives.shape == (int((batch["target_ids"] > 0).sum()), cfg.train.num_negatives)
            if in_batch:
                assert set(negatives.unique().tolist()) <= targets
        drawn[in_batch] = set(torch.cat([n.flatten() for _, n in batches]).tolist())
    assert len(drawn[False]) > len(drawn[True]) and not drawn[False] <= drawn[True]


def test_model_artifact_round_trip_through_folder_and_registry(tiny, one_epoch_run, tmp_path):
    from genrec.config import ConfigError
    from genrec.artifact import load_model, save_model_folder

    cfg, _ = tiny
    result = one_epoch_run
    from_registry, saved_cfg = load_model(f"models:/tiny/{result['version']}", cfg.tracking.tracking_uri)
    assert saved_cfg.model == cfg.model and not from_registry.training
    folder = save_model_folder(tmp_path / "model", saved_cfg, from_registry.state_dict())
    from_folder, _ = load_model(folder)
    for (name, a), (_, b) in zip(from_registry.state_dict().items(), from_folder.state_dict().items()):
        assert torch.equal(a, b), name
    batch = (torch.tensor([3, 7, 9]), torch.tensor([10, 20, 30]), torch.tensor([20, 30, 40]), torch.tensor([0, 3]))
    assert torch.equal(from_registry(*batch), from_folder(*batch))
    assert evaluate_model(cfg, str(folder), "test") == evaluate_model(cfg, f"models:/tiny/{result['version']}", "test")
    with pytest.raises(FileNotFoundError, match="not a genrec model folder: no model.pt"):
        load_model(tmp_path)
    # the model keeps its own shape: batches may not keep more than the 16 items it was built for
    longer = cfg.model_copy(deep=True)
    longer.batching.max_seq_len = 8
    assert evaluate_model(longer, str(folder), "test")["count"] == 240
    longer.batching.max_seq_len = 32
    with pytest.raises(ConfigError, match=r"batching.max_seq_len=32 exceeds the max_seq_len=16"):
        evaluate_model(longer, str(folder), "test")


def test_paper_protocol_options(tiny):
    """train_on: train_and_valid trains on each user's validation target too (as the paper's
    code does) and reports test at the last evaluation; eval.test_epochs adds fixed-epoch test."""
    from genrec.data.prepared import read_split

    cfg, _ = tiny
    run = variant(cfg, "paper-protocol", epochs=2, train_on="train_and_valid")
    run.eval.test_epochs = [1, 2]
    run.model.attention_normalizer = 21
    result = fit(run, log=lambda *_: None)
    first, second = result["history"]
    assert "test/ndcg@10" in first and "test/ndcg@10" in second
    assert result["best"]["best_epoch"] == 2 and result["best"]["test/ndcg@10"] == second["test/ndcg@10"]
    lengths = [len(items) for items in read_split(cfg.data.output_dir, "valid")["items"].to_pylist()]
    tokens = sum(min(n - 1, cfg.model.max_seq_len) for n in lengths)
    assert first["train/tokens_per_s"] * first["train/epoch_seconds"] == pytest.approx(tokens)
