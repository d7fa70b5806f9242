"""A user's own file through the job scripts, as the README's "Your own data" runs them: what the
terminal shows, what is checked before Ray starts, and the registered name of each model kind."""

import os
import random
import re
import subprocess
import sys

import pytest

from conftest import REPO


def job(script: str, config, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, f"jobs/{script}", "--config", str(config)]
    for override in overrides:
        command += ["--set", override]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def ratings_tsv(tmp_path_factory):
    """A headerless TSV of (user, item, rating, timestamp), as MovieLens-100k's u.data, and its config."""
    folder = tmp_path_factory.mktemp("own-data")
    rng = random.Random(0)
    lines = [f"{user}\t{rng.randint(1, 40)}\t{rng.randint(1, 5)}\t{881_250_000 + 600 * user + 60 * k}"
             for user in range(1, 41) for k in range(rng.randint(4, 12))]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    config = folder / "ratings.yaml"
    config.write_text(f"""
name: own-ratings
data:
  source:
    kind: csv
    path: {folder / 'u.data'}
    delimiter: "\\t"
    header: false
    column_names: [user, item, rating, ts]
    columns: {{user_id: user, item_id: item, timestamp: ts, value: rating, action: rating}}
    actions: {{names: [rating_1, rating_2, rating_3, rating_4, rating_5], prefix: rating_}}
  output_dir: {folder / 'data'}
model: {{kind: hstu, dim: 8, num_blocks: 1, num_heads: 1, max_seq_len: 12}}
train: {{epochs: 1, batch_size: 16, num_negatives: 8, storage_path: {folder / 'runs'}, cpus_per_worker: 1}}
tracking: {{tracking_uri: "sqlite:///{folder / 'mlflow.db'}", experiment: own-data}}
""")
    return folder, config, len(lines)


# Ray's own log lines: "2026-01-01 10:00:00,000<TAB>WARNING file.py:85 -- ..." (Python), "[... W ...] file.cc:"
# (C++); MLflow's: "2026/01/01 10:00:00 INFO mlflow.store.db.utils: Creating initial MLflow database tables..."
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING)|^\[\d{4}-\d\d-\d\d [\d:,]+ [IW] "
                          r"|^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING) mlflow", re.M)


def test_prepare_and_train_jobs_show_genrec_lines_only(ratings_tsv):
    """The jobs start their own local Ray cluster (token authentication on, Ray's default); Ray's warning
    that it is on, and its other log lines, stay off the terminal."""
    folder, config, rows = ratings_tsv
    prepared = job("prepare.py", config)
    terminal = prepared.stdout + prepared.stderr
    assert prepared.returncode == 0, terminal[-3000:]
    assert "Token authentication" not in terminal and not RAY_LOG_LINE.search(terminal), terminal
    assert re.search(rf"input rows\s+{rows:,}", prepared.stdout)
    assert 'actions           ["rating_1", "rating_2", "rating_3", "rating_4", "rating_5"]' in prepared.stdout

    trained = job("train.py", config)
    terminal = trained.stdout + trained.stderr
    assert trained.returncode == 0, terminal[-3000:]
    assert "Token authentication" not in terminal and not RAY_LOG_LINE.search(terminal), terminal
    assert "[train] epoch 1/1" in trained.stdout and "registered 'own-ratings' version 1" in trained.stdout

    # another model.kind under the same registered name is refused before training starts
    refused = job("train.py", config, "model.kind=sasrec", env={"RAY_TMPDIR": str(folder / "ray-not-started")})
    assert refused.returncode == 2
    assert ("error: registered model 'own-ratings' holds model.kind 'hstu' (version 1); this run trains model.kind "
            "'sasrec': set tracking.registered_model (e.g. 'own-ratings-sasrec')") in refused.stderr
    assert "Traceback" not in refused.stderr and not (folder / "ray-not-started").exists()


def test_a_missing_source_file_is_reported_before_ray_starts(ratings_tsv, tmp_path):
    _, config, _ = ratings_tsv
    ray_dir = tmp_path / "ray"
    result = job("prepare.py", config, f"data.source.path={tmp_path / 'nowhere.tsv'}",
                 f"data.output_dir={tmp_path / 'out'}", env={"RAY_TMPDIR": str(ray_dir)})
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: CSV event log not found: {tmp_path / 'nowhere.tsv'}"
    assert not ray_dir.exists()  # Ray never started (it makes its session folder there first)
