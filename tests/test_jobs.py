"""The recipes as a user runs them: `ray job submit` against a running head node (token auth on),
tracking to a shared MLflow server (`make mlflow`) over HTTP, as on a cluster whose nodes share no disk:
raw events, prepared data, checkpoints and MLflow's artifacts in object storage (a real S3 API server
on 127.0.0.1, tests/s3server.py)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import REPO, fixed_replicas
from s3server import BUCKET

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(s3):
    """A Ray head of our own (own temp dir and ports), stopped by PID: `ray stop` would end every cluster.
    Its processes inherit the session's AWS variables (the `s3` fixture), as a cluster's nodes have a role."""
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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3):
    """`make mlflow` on a free port: a real `mlflow server` (sqlite backend in its own folder, proxied
    artifact root on s3), bound to 127.0.0.1; stopped by its process group."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(
            ["make", "-o", ".venv/.installed-stamp", "mlflow", f"MLFLOW_PORT={port}", f"MLFLOW_DIR={folder}",
             "MLFLOW_WORKERS=1", f"MLFLOW_ARTIFACTS=s3://{BUCKET}/jobs-test/mlflow"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield f"http://127.0.0.1:{port}", folder, server
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def wait_until_up(url: str, server, folder: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow server not up after {timeout} s:\n{(folder / 'server.log').read_text()[-3000:]}")


def submit(address, env, *command, retries=10, env_vars=None):
    runtime_env = json.dumps({"env_vars": {"GENREC_ROOT": str(REPO), **(env_vars or {})}})
    for _ in range(retries):  # the job agent comes up a few seconds after the head
        result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                                 "--runtime-env-json", runtime_env, "--", *command],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stdout + result.stderr:
            return result
        time.sleep(3)
    return result


def test_prepare_train_and_evaluate_as_ray_jobs_with_no_shared_disk(head_node, mlflow_server, s3, tmp_path):
    """prepare (raw events and prepared data on s3) -> train (checkpoints on s3, registered through the
    MLflow server, its artifacts on s3) -> evaluate the registered model -> serve it from the registry."""
    from mlflow.tracking import MlflowClient

    from genrec.storage import location

    address, env = head_node
    url, server_folder, server = mlflow_server
    # as on a cluster: the config names no tracking URI. Model downloads go through the server: MLflow's
    # default, presigned URLs straight to the bucket, is refused by moto's IAM checks (tests/test_storage_serve.py)
    tracked = {"MLFLOW_TRACKING_URI": url, "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
    bucket = f"s3://{BUCKET}/jobs-test"
    config = tmp_path / "job.yaml"
    config.write_text(f"""
name: job-test
data:
  source: {{kind: synthetic, num_users: 200, num_items: 80, mean_events_per_user: 15, num_shards: 2, path: {bucket}/raw}}
  output_dir: {bucket}/data
model: {{kind: sasrec, dim: 8, num_blocks: 1, num_heads: 1, max_seq_len: 12}}
train: {{epochs: 1, batch_size: 64, num_negatives: 8, storage_path: {bucket}/runs, cpus_per_worker: 1}}
tracking: {{experiment: job-test}}
""")
    prepared = submit(address, env, "python", "jobs/prepare.py", "--config", str(config))
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    assert "succeeded" in prepared.stdout + prepared.stderr
    assert "== prepare summary ==" in prepared.stdout and location(f"{bucket}/data/manifest.json").is_file()
    assert location(f"{bucket}/raw").list_files(suffixes=(".parquet",)), "the synthetic shards are not on s3"
    wait_until_up(url, server, server_folder)
    trained = submit(address, env, "python", "jobs/train.py", "--config", str(config), env_vars=tracked)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "[train] epoch 1/1" in trained.stdout and "registered 'job-test' version 1" in trained.stdout
    # the run, its metrics and the registered model are read back from the server over HTTP;
    # the model files went through the server into its artifact root
    client = MlflowClient(url)
    version = client.get_model_version("job-test", "1")
    run = client.get_run(version.run_id)
    assert run.data.params["model.kind"] == "sasrec"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    # checkpoints and the model files are objects on s3; nothing was written to a local disk instead
    assert [f for f in location(f"{bucket}/runs/job-test").list_files() if "checkpoint_" in f.path]
    assert [f for f in location(f"{bucket}/mlflow").list_files() if "/model_files/" in f.path]
    assert not list(server_folder.glob("artifacts/**/model_files/*"))
    assert not (tmp_path / "mlflow.db").exists() and not (REPO / "mlruns" / "job-test").exists()
    assert not (REPO / "outputs" / "ray_results" / "job-test").exists()

    evaluated = submit(address, env, "python", "jobs/evaluate.py", "--config", str(config),
                       "--model", "models:/job-test/1", "--split", "test", env_vars=tracked)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    printed = evaluated.stdout[evaluated.stdout.index('{\n "model"'):]
    metrics = json.loads(printed[:printed.index("\n}") + 2])
    assert metrics["model"] == "models:/job-test/1" and metrics["split"] == "test"
    assert metrics["ndcg@10"] == pytest.approx(run.data.metrics["best/test/ndcg_at_10"], abs=1e-6)

    # serve: the registered model over HTTP from a job that stays up until it is stopped
    port = free_port()
    serving = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--no-wait",
         "--runtime-env-json", json.dumps({"env_vars": {"GENREC_ROOT": str(REPO), **tracked}}), "--",
         "python", "jobs/serve.py", "--config", "configs/serve/demo.yaml", "--set", "model.uri=models:/job-test/1",
         "--set", f"model.tracking_uri={url}", "--set", f"http_options.port={port}",
         "--set", f"store.events_db={tmp_path / 'events.sqlite'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert serving.returncode == 0, serving.stdout[-3000:] + serving.stderr[-3000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", serving.stdout + serving.stderr).group(0)
    try:
        answer = post_when_up(f"http://127.0.0.1:{port}/v1/retrieve", {"user_id": 1, "k": 5}, timeout=240)
        assert answer["model"]["name"] == "job-test" and answer["model"]["version"] == "1"
        assert len(answer["items"]) == 5 and not answer["cold_start"]
    finally:
        stopped = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job_id],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]


def post_when_up(url: str, body: dict, timeout: float) -> dict:
    """POST once the server answers (Serve starts its replicas after the job starts)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.loads(r.read())
        except OSError as error:
            last = error
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} after {timeout} s: {last}")


def test_serve_job_stops_on_ctrl_c_without_rays_internals_on_the_terminal(tiny_registered_model, tmp_path):
    """`make serve`'s job on its own local Ray: up, Ctrl-C, exit 0, and what the terminal got is genrec's
    lines only: no '(raylet) ... killed by ray.kill' or 'A worker died' from the shutdown."""
    m, port = tiny_registered_model, free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    serving = subprocess.Popen(
        [sys.executable, "jobs/serve.py", "--config", "configs/serve/demo.yaml", "--num-cpus", "1",
         "--set", f"model.uri={m['uri']}", "--set", f"model.tracking_uri={m['tracking_uri']}",
         "--set", f"http_options.port={port}", "--set", f"store.events_db={tmp_path / 'events.sqlite'}",
         *(arg for override in fixed_replicas() for arg in ("--set", override))],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        answer = post_when_up(f"http://127.0.0.1:{port}/v1/retrieve", {"user_id": 1, "k": 3}, timeout=400)
        assert len(answer["items"]) == 3
    finally:
        serving.send_signal(signal.SIGINT)
        output, _ = serving.communicate(timeout=120)
    assert serving.returncode == 0, output[-6000:]
    assert "genrec is serving at" in output and "shutting down" in output
    for internal in ("(raylet)", "ray.kill", "A worker died", "Traceback"):
        assert internal not in output, output[-3000:]
