"""From one machine to a cluster: cluster.yaml passes Ray's own launcher validation, and the
autoscaler adds worker nodes for a job that needs more CPUs than the head has, then removes them.

The autoscaling test runs a fake multi-node cluster on this machine (Ray's fake_multinode
provider: each "node" is a raylet of its own). `ray.cluster_utils.AutoscalingCluster` cannot be
used as is: the 2.60 wheel lacks its example config and its start() runs `ray stop --force`,
which would end every Ray cluster on the machine. The head is started here with its own temp
dir and ports and stopped by PID.
"""

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO

BIN = Path(sys.executable).parent


def launcher_check(config: dict) -> None:
    """What `ray up` checks before it launches anything (schema + node types)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_launcher_validation(cluster_yaml):
    launcher_check(cluster_yaml)
    types = cluster_yaml["available_node_types"]
    head = types[cluster_yaml["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no task may run on the head"
    assert types["cpu_worker"]["max_workers"] >= 1 and "GPU" not in types["cpu_worker"]["resources"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] <= types[name]["max_workers"] <= cluster_yaml["max_workers"]
    starts = " ".join(cluster_yaml["head_start_ray_commands"] + cluster_yaml["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in starts and "--dashboard-host=127.0.0.1" in starts


@pytest.mark.parametrize("typo", [
    ("idle_timeout_minute", 5),                                   # top-level key misspelt
    ("available_node_types.cpu_worker.min_worker", 0),            # node-type key misspelt
    ("available_node_types.gpu_worker.max_workers", "four"),      # wrong type
    ("head_node_type", "haed"),                                   # names no node type
])
def test_planted_typo_fails_validation(cluster_yaml, typo):
    dotted, value = typo
    broken = copy.deepcopy(cluster_yaml)
    node = broken
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    with pytest.raises(Exception) as err:
        launcher_check(broken)
    assert last in str(err.value) or str(value) in str(err.value), str(err.value)[:500]


# ----------------------------------------------------------------------------- autoscaling

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


IDLE_TIMEOUT_S = 6


def fake_cluster_config(gcs_address: str) -> dict:
    """A launcher config for the fake provider: a head without CPUs (as in cluster.yaml)
    and a CPU worker type of 1 CPU, 0 to 2 nodes, removed after IDLE_TIMEOUT_S idle."""
    return {
        "cluster_name": "genrec-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 1, "object_store_memory": 200 * 2**20}, "node_config": {},
                           "min_workers": 0, "max_workers": 2},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def fake_cluster():
    """A fake multi-node head of our own: own temp dir and ports, token auth on, stopped by PID."""
    temp = tempfile.mkdtemp(prefix="genrec-as-", dir="/tmp")
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    config = Path(temp) / "autoscaler.json"
    config.write_text(json.dumps(fake_cluster_config(gcs)))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=0", "--include-dashboard=false", f"--autoscaling-config={config}",
                    f"--metrics-export-port={free_port()}", f"--temp-dir={temp}", "--object-store-memory=200000000",
                    f"--ray-client-server-port={free_port()}"],
                   env=env, check=True, capture_output=True, timeout=120)
    yield gcs, env, temp
    for p in psutil.process_iter(["cmdline"]):
        if temp in " ".join(p.info["cmdline"] or []):
            p.kill()
    shutil.rmtree(temp, ignore_errors=True)


def worker_nodes(gcs: str, env: dict) -> int:
    """Alive worker nodes of the fake cluster, as `ray status` reports them."""
    out = subprocess.run([str(BIN / "ray"), "status", "--address", gcs], env=env, capture_output=True,
                         text=True, timeout=60).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(int(n) for n in re.findall(r"^\s*(\d+) cpu_worker", active, flags=re.M))


def test_autoscaler_adds_nodes_for_a_job_and_removes_them_when_idle(fake_cluster, tmp_path):
    gcs, env, _ = fake_cluster
    assert worker_nodes(gcs, env) == 0
    # a training job of 2 workers x 1 CPU on a head with 0 CPUs: only new nodes can run it
    config = tmp_path / "job.yaml"
    config.write_text(f"""
name: autoscale
data:
  source: {{kind: synthetic, num_users: 120, num_items: 60, mean_events_per_user: 12, num_shards: 2, path: {tmp_path / 'raw'}}}
  output_dir: {tmp_path / 'data'}
  num_partitions: 2
model: {{kind: sasrec, dim: 8, num_blocks: 1, num_heads: 1, max_seq_len: 10}}
train: {{epochs: 1, batch_size: 64, num_negatives: 4, num_workers: 2, cpus_per_worker: 1, threads_per_worker: 1,
         storage_path: {tmp_path / 'runs'}}}
eval: {{batch_size: 128}}
tracking: {{tracking_uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: autoscale}}
ray: {{address: "{gcs}"}}
""")
    job_env = {**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    job_env.pop("RAY_FAKE_CLUSTER")
    started = time.time()
    peak = 0
    for script in ("jobs/prepare.py", "jobs/train.py"):
        job = subprocess.Popen([sys.executable, script, "--config", str(config)], cwd=REPO, env=job_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while job.poll() is None:
            peak = max(peak, worker_nodes(gcs, env))
            time.sleep(1)
        output = job.stdout.read()
        assert job.returncode == 0, f"{script} failed:\n{output[-4000:]}"
    took = time.time() - started
    assert peak == 2, f"the autoscaler should have added 2 cpu_worker nodes (saw at most {peak})"
    assert "[train] epoch 1/1" in output and "registered 'autoscale' version 1" in output
    # idle nodes go away after idle_timeout_minutes
    deadline = time.time() + IDLE_TIMEOUT_S + 60
    while (left := worker_nodes(gcs, env)) and time.time() < deadline:
        time.sleep(2)
    assert left == 0, f"{left} idle worker node(s) still up {IDLE_TIMEOUT_S + 60} s after the job (jobs took {took:.0f} s)"


# ----------------------------------------------------------------------------- storage paths

def test_storage_paths_are_mounted_paths_or_object_store_uris(tmp_path, monkeypatch):
    from genrec.config import ConfigError, load_config

    base = tmp_path / "c.yaml"
    base.write_text("data: {source: {kind: synthetic}}\n")
    monkeypatch.setenv("GENREC_ROOT", "/mnt/genrec")  # how jobs run on the cluster (cluster.yaml)
    from genrec.config import resolve_path

    cfg = load_config(base)
    assert resolve_path(cfg.train.storage_path) == Path("/mnt/genrec/outputs/ray_results")
    assert resolve_path(cfg.data.output_dir) == Path("/mnt/genrec/outputs/data/default")
    cfg = load_config(base, ["train.storage_path=/mnt/efs/runs", "data.output_dir=/mnt/efs/data"])
    assert resolve_path(cfg.train.storage_path) == Path("/mnt/efs/runs")
    # no shared disk: object-store URIs are taken as they are, not resolved against GENREC_ROOT
    from genrec.storage import location

    monkeypatch.setenv("AWS_REGION", "us-west-2")  # else opening the URI asks the bucket for its region

    cfg = load_config(base, ["train.storage_path=s3://bucket/runs", "data.output_dir=s3://bucket/data/x"])
    for uri in (cfg.train.storage_path, cfg.data.output_dir):
        assert location(uri).uri == uri and not location(uri).is_local
    with pytest.raises(ConfigError, match="train.storage_path"):
        load_config(base, ["train.storage_path=7"])  # still typed: a number is not a path


def test_tracking_uri_from_config_then_environment(tmp_path, monkeypatch):
    from genrec.config import load_config
    from genrec.train.tracking import tracking_uri

    base = tmp_path / "c.yaml"
    base.write_text("data: {source: {kind: synthetic}}\n")
    monkeypatch.setenv("GENREC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(load_config(base)) == f"sqlite:///{tmp_path}/outputs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert tracking_uri(load_config(base)) == "http://10.0.0.5:5000"
    assert tracking_uri(load_config(base, ["tracking.tracking_uri=http://127.0.0.1:5001"])) == "http://127.0.0.1:5001"
