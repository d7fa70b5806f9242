"""Shared fixtures: one real local Ray cluster per test session, paths to the shared data."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML1M = Path(os.environ.get("GENREC_ML1M", REPO.parent / "shared" / "data" / "ml-1m"))


def tiny_ranking_config(root: Path, name: str, model: dict, tasks: list, num_users: int = 240,
                        num_items: int = 120, mean_events_per_user: int = 20, **train):
    """The config of a tiny multi-action synthetic world (prepared under root) and a ranker on it that
    trains in seconds: the ranking tests' common setup."""
    from genrec.config import ExperimentConfig

    return ExperimentConfig.model_validate({
        "name": name,
        "data": {"source": {"kind": "synthetic", "num_users": num_users, "num_items": num_items,
                            "mean_events_per_user": mean_events_per_user, "multi_action_rate": 0.3, "num_shards": 2,
                            "path": str(root / "raw")},
                 "output_dir": str(root / "data"), "num_partitions": 2},
        "model": {"dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0, "max_seq_len": 12, **model},
        "batching": {"layout": "interleaved"},
        "ranking": {"tasks": [t if isinstance(t, dict) else {"name": t, "action": t} for t in tasks]},
        "train": {"batch_size": 48, "num_negatives": 16, "storage_path": str(root / "runs"), "cpus_per_worker": 0.5,
                  "threads_per_worker": 1, **train},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
    })


def fixed_replicas(ingress: int = 1, retrieval: int = 1, ranking: int = 1) -> list[str]:
    """Serve file overrides: this many replicas of each deployment, autoscaling off. The shipped file keeps
    2+ of each (a kill then costs little); a test app that does not kill replicas starts fewer (2 cores)."""
    counts = {"Ingress": ingress, "Retrieval": retrieval, "Ranking": ranking}
    return [o for d, n in counts.items() for o in (f"deployments.{d}.num_replicas={n}",
                                                    f"deployments.{d}.autoscaling_config=null")]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API server on 127.0.0.1 (tests/s3server.py) with the bucket s3server.BUCKET; its admin
    keys and endpoint are in this session's environment, so Ray's workers (started after) reach it too."""
    import s3server

    server = s3server.start(tmp_path_factory.mktemp("s3"))
    os.environ.update(server.env())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3):
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Train's preemption watcher is one more actor process per run (about 2 s of CPU to start, on 2 cores),
    # polling node drains that a local cluster never has
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ml1m_dir():
    ratings = ML1M / "ratings.partial_users_1-2999.dat"
    assert ratings.is_file(), f"MovieLens-1M is expected at {ML1M} (../shared/data/ml-1m)"
    return ML1M


@pytest.fixture(scope="session")
def tiny_registered_model(ray_cluster, tmp_path_factory):
    """A tiny HSTU (2 blocks, N = 16) trained 2 epochs on a small synthetic world and registered in a
    sqlite MLflow store: what the serving tests load by registry URI. Trained once per session, on 2
    workers with the item table split row-wise (model.embedding_sharding): the artifact of a sharded
    run is an ordinary model, served as any other."""
    from genrec.config import ExperimentConfig
    from genrec.data.pipeline import prepare
    from genrec.train.trainer import fit

    root = tmp_path_factory.mktemp("tiny-model")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = ExperimentConfig.model_validate({
        "name": "tiny-serve",
        "data": {"source": {"kind": "synthetic", "num_users": 200, "num_items": 120, "mean_events_per_user": 14,
                            "num_shards": 2, "path": str(root / "raw")},
                 "output_dir": str(root / "data"), "num_partitions": 2},
        "model": {"kind": "hstu", "dim": 16, "num_blocks": 2, "num_heads": 1, "dropout": 0.0, "max_seq_len": 16,
                  "embedding_sharding": "row_wise"},
        "train": {"epochs": 2, "batch_size": 64, "num_negatives": 16, "storage_path": str(root / "runs"),
                  "cpus_per_worker": 0.5, "threads_per_worker": 1, "seed": 5, "num_workers": 2},
        "tracking": {"tracking_uri": tracking_uri, "experiment": "tests", "registered_model": "tiny-serve"},
    })
    prepare(cfg.data, log=lambda *_: None)
    result = fit(cfg, log=lambda *_: None)
    return {"cfg": cfg, "root": root, "tracking_uri": tracking_uri, "uri": f"models:/tiny-serve/{result['version']}",
            "run_id": result["mlflow_run_id"], "version": str(result["version"])}
