"""The recipes as a user runs them: `ray job submit` against a running head node (token auth on)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    """A Ray head of our own (own temp dir and ports), stopped by PID: `ray stop` would end every cluster."""
    temp = tempfile.mkdtemp(prefix="genrec-head-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    dashboard = free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
                    f"--metrics-export-port={free_port()}", "--include-dashboard=true", "--num-cpus=2",
                    f"--temp-dir={temp}", "--object-store-memory=500000000"],
                   env=env, check=True, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dashboard}"
    yield address, env
    for p in psutil.process_iter(["cmdline"]):
        if temp in " ".join(p.info["cmdline"] or []):
            p.kill()
    shutil.rmtree(temp, ignore_errors=True)


def submit(address, env, *command, retries=10):
    for _ in range(retries):  # the job agent comes up a few seconds after the head
        result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                                 "--runtime-env-json", f'{{"env_vars": {{"GENREC_ROOT": "{REPO}"}}}}', "--", *command],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stdout + result.stderr:
            return result
        time.sleep(3)
    return result


def test_prepare_and_train_as_ray_jobs(head_node, tmp_path):
    address, env = head_node
    config = tmp_path / "job.yaml"
    config.write_text(f"""
name: job-test
data:
  source: {{kind: synthetic, num_users: 200, num_items: 80, mean_events_per_user: 15, num_shards: 2, path: {tmp_path / 'raw'}}}
  output_dir: {tmp_path / 'data'}
model: {{kind: sasrec, dim: 8, num_blocks: 1, num_heads: 1, max_seq_len: 12}}
train: {{epochs: 1, batch_size: 64, num_negatives: 8, storage_path: {tmp_path / 'runs'}, cpus_per_worker: 1}}
tracking: {{tracking_uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: job-test}}
""")
    prepared = submit(address, env, "python", "jobs/prepare.py", "--config", str(config))
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    assert "succeeded" in prepared.stdout + prepared.stderr
    assert "== prepare summary ==" in prepared.stdout and (tmp_path / "data" / "manifest.json").exists()
    trained = submit(address, env, "python", "jobs/train.py", "--config", str(config))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "[train] epoch 1/1" in trained.stdout and "registered 'job-test' version 1" in trained.stdout
