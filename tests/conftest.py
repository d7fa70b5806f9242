"""Shared fixtures: one real local Ray cluster per test session, paths to the shared data."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML1M = Path(os.environ.get("GENREC_ML1M", REPO.parent / "shared" / "data" / "ml-1m"))


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
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
