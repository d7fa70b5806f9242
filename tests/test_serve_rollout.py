"""Rolling a new model version out of the running Serve app while requests keep coming: none fails, the
answers' version goes from the old to the new one (and the new one really scores them); a version that
does not load (not in the registry, or broken weights) leaves the live one serving, and says so; an
ingress replica started after that failure serves the last live version instead of crash-looping; a model
replica that cannot load the new version after the switch leaves its requests to the previous one; a model
folder in object storage (a real S3 API server) rolls out like a registered version, and one on a missing
bucket is refused in one line; and jobs/serve.py applies its file again on SIGHUP. The app runs 2 replicas of each model deployment, so every
rollout here has a replica that loads the new version late (at its first request for it)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import mlflow
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import fixed_replicas
from genrec.artifact import build_model, load_model, save_model_folder
from genrec.serve.deploy import load_serve_file, start
from genrec.storage import location, upload
from s3server import BUCKET
from genrec.train.tracking import MODEL_FILES

REPO = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(m: dict, state_dict: dict, corrupt: bool = False) -> str:
    """Another version of the tiny registered model, as training registers one -> its models:/ URI."""
    mlflow.set_tracking_uri(m["tracking_uri"])
    client = MlflowClient(m["tracking_uri"])
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(experiment_id=client.get_run(m["run_id"]).info.experiment_id) as run:
        folder = save_model_folder(Path(tmp) / "model", m["cfg"], state_dict)
        if corrupt:
            (folder / "model.pt").write_bytes(b"not a state dict")
        mlflow.log_artifacts(str(folder), artifact_path=MODEL_FILES)
    version = client.create_model_version("tiny-serve", f"{run.info.artifact_uri}/{MODEL_FILES}", run_id=run.info.run_id)
    return f"models:/tiny-serve/{version.version}"


@pytest.fixture(scope="module")
def served(tiny_registered_model, tmp_path_factory):
    from ray import serve

    m = tiny_registered_model
    torch.manual_seed(11)
    good = register(m, build_model(m["cfg"]).state_dict())  # other weights: other answers
    broken = register(m, build_model(m["cfg"]).state_dict(), corrupt=True)
    base = [f"model.tracking_uri={m['tracking_uri']}",
            f"store.events_db={tmp_path_factory.mktemp('rollout') / 'events.sqlite'}",
            "retrieval.candidates=30", "http_options.port=" + str(free_port())]
    base += fixed_replicas(retrieval=2, ranking=2)

    def tree(uri, *more):
        return load_serve_file(REPO / "configs" / "serve" / "demo.yaml", [f"model.uri={uri}", *base, *more])

    url = start(tree(m["uri"]))
    yield {"url": url, "tree": tree, "v1": m["uri"], "good": good, "broken": broken, "m": m}
    serve.shutdown()


class Stream:
    """Threads posting /v1/recommend (retrieval, then ranking) back to back, recording when each request was
    sent and answered, its status and the version that answered it."""

    def __init__(self, url: str, users: list, threads: int = 3):
        self.url, self.users, self.stop = url, users, threading.Event()
        self.seen: list[tuple[float, float, int, str | None]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, i: int):
        with httpx.Client(base_url=self.url, timeout=60) as http:
            n = i
            while not self.stop.is_set():
                sent = time.time()
                r = http.post("/v1/recommend", json={"user_id": self.users[n % len(self.users)], "k": 5})
                self.seen.append((sent, time.time(), r.status_code,
                                  r.json()["model"]["version"] if r.is_success else r.text))
                n += len(self.threads)

    def versions_since(self, t0: float) -> list:
        return [v for _, t, _, v in self.seen if t >= t0]

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_new_version_rolls_out_with_no_failed_request_and_a_broken_one_never_goes_live(served):
    url, http = served["url"], httpx.Client(base_url=served["url"], timeout=60)
    v1, good = served["v1"].rsplit("/", 1)[1], served["good"].rsplit("/", 1)[1]
    users = http.get("/v1/users", params={"limit": 20}).json()
    stream = Stream(url, users)
    try:
        wait_for(lambda: len(stream.seen) >= 6, 60, "answers from the first version")
        t_roll = time.time()
        assert start(served["tree"](served["good"])) == url  # as `serve deploy` with the new user_config
        wait_for(lambda: stream.versions_since(t_roll).count(good) >= 6, 90, f"answers from version {good}")
        info = http.get("/v1/model").json()
        assert info["version"] == good
        assert info["rollout"] | {"at": None} == {"state": "live", "target": served["good"], "version": good,
                                                  "previous": v1, "error": None, "fallbacks": 0, "at": None}

        # the new weights answer, not only the new label: retrieval equals version `good` run directly
        retrieval_equals_the_model(served, http, users[0], load_model(served["good"], served["m"]["tracking_uri"]),
                                   good)

        # versions that do not load: the live one keeps answering, the failure is reported
        for bad, why in (("models:/tiny-serve/999", "999"), (served["broken"], "UnpicklingError")):
            t_bad = time.time()
            start(served["tree"](bad))
            rollout = wait_for(lambda: (r := http.get("/v1/model").json()["rollout"])["target"] == bad
                               and r["state"] == "failed" and r, 60, f"the failure of {bad}")
            assert rollout["version"] == good and why in rollout["error"], rollout
            wait_for(lambda: len(stream.versions_since(t_bad)) >= 6, 60, "answers after the failed rollout")
    finally:
        stream.close()
    statuses = [s for _, _, s, _ in stream.seen]
    versions = [v for _, _, _, v in stream.seen]
    assert set(statuses) == {200}, [x for x in stream.seen if x[2] != 200][:5]
    assert set(versions) == {v1, good}
    # old, then new, never back: once an answer named the new version, every request sent after it gets the new
    # one (a request sent before may still finish on the old one after that answer: its replica was loading)
    first_new = min(done for _, done, _, v in stream.seen if v == good)
    assert {v for sent, _, _, v in stream.seen if sent > first_new} == {good}
    assert http.get("/v1/model").json()["rollout"]["fallbacks"] == 0  # every replica loaded version `good`
    print(f"{len(versions)} requests, 0 failed: {versions.count(v1)} answered by version {v1}, "
          f"{versions.count(good)} by {good} (two failed rollouts among them)")


def test_an_ingress_replica_started_after_a_failed_rollout_serves_the_last_live_version(served):
    """The target in Serve's config is still the broken version: a new replica (a restart here) must not
    crash-loop on it, but serve the version that went live last, reporting the failure."""
    http = httpx.Client(base_url=served["url"], timeout=60)
    good = served["good"].rsplit("/", 1)[1]
    assert http.get("/v1/model").json()["rollout"]["target"] == served["broken"]
    replica = [p for p in psutil.Process().children(recursive=True)
               if "ServeReplica:genrec:Ingress" in " ".join(p.cmdline())]
    assert len(replica) == 1
    replica[0].kill()

    def answer():
        if replica[0].is_running() and replica[0].status() != psutil.STATUS_ZOMBIE:
            return None
        try:
            r = http.get("/v1/model")
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    info = wait_for(answer, 90, "a new ingress replica")
    assert info["version"] == good
    assert info["rollout"]["state"] == "failed" and info["rollout"]["target"] == served["broken"]
    assert "UnpicklingError" in info["rollout"]["error"]
    users = http.get("/v1/users", params={"limit": 3}).json()
    assert http.post("/v1/recommend", json={"user_id": users[0], "k": 3}).json()["model"]["version"] == good


def test_moving_the_alias_rolls_out_the_version_it_names(served):
    """model.watch_s: the ingress re-resolves models:/tiny-serve@champion; moving the alias in the registry
    is the whole rollout (no deploy)."""
    http = httpx.Client(base_url=served["url"], timeout=60)
    client = MlflowClient(served["m"]["tracking_uri"])
    v1, good = served["v1"].rsplit("/", 1)[1], served["good"].rsplit("/", 1)[1]
    client.set_registered_model_alias("tiny-serve", "champion", v1)
    start(served["tree"]("models:/tiny-serve@champion", "model.watch_s=0.5"))
    assert http.get("/v1/model").json()["version"] == v1  # the alias was resolved when the config was applied
    client.set_registered_model_alias("tiny-serve", "champion", good)
    info = wait_for(lambda: (i := http.get("/v1/model").json())["version"] == good and i, 30, "the alias's version")
    assert info["rollout"]["state"] == "live" and info["rollout"]["previous"] == v1
    users = http.get("/v1/users", params={"limit": 3}).json()
    assert http.post("/v1/recommend", json={"user_id": users[0], "k": 3}).json()["model"]["version"] == good


def test_a_replica_that_cannot_load_the_new_version_leaves_its_requests_to_the_previous_one(served):
    """The rollout loads the new version in one replica of each model deployment; then its artifact is deleted
    (as if the artifact store lost it), so the other replicas' first load of it fails. Their requests are
    answered by the previous version, whole and naming it; none fails; GET /v1/model reports it."""
    http = httpx.Client(base_url=served["url"], timeout=60)
    m = served["m"]
    previous = http.get("/v1/model").json()["version"]
    torch.manual_seed(12)
    late = register(m, build_model(m["cfg"]).state_dict())
    version = late.rsplit("/", 1)[1]
    start(served["tree"](late))
    assert http.get("/v1/model").json()["rollout"] | {"at": None} == {
        "state": "live", "target": late, "version": version, "previous": previous, "error": None, "fallbacks": 0,
        "at": None}
    artifact = urlparse(MlflowClient(m["tracking_uri"]).get_model_version("tiny-serve", version).source)
    assert artifact.scheme in ("", "file") and Path(artifact.path).is_dir(), artifact
    shutil.rmtree(artifact.path)

    users = http.get("/v1/users", params={"limit": 20}).json()
    stream = Stream(served["url"], users, threads=4)
    try:  # a request reaches the late replica of Retrieval or of Ranking with probability 3/4
        wait_for(lambda: {previous, version} <= set(stream.versions_since(0)), 60, "answers of both versions")
    finally:
        stream.close()
    statuses = [s for _, _, s, _ in stream.seen]
    versions = [v for _, _, _, v in stream.seen]
    assert set(statuses) == {200}, [x for x in stream.seen if x[2] != 200][:5]
    rollout = http.get("/v1/model").json()["rollout"]
    assert rollout["state"] == "degraded" and rollout["version"] == version and rollout["previous"] == previous
    assert rollout["fallbacks"] == versions.count(previous) > 0  # every answer by the previous version is one
    assert f"could not load version {version}" in rollout["error"] and f"{late} did not load" in rollout["error"]
    print(f"{len(versions)} requests, 0 failed: {versions.count(version)} answered by version {version}, "
          f"{versions.count(previous)} by {previous} (a replica could not load {version})")


def retrieval_equals_the_model(served, http, user, loaded, version: str) -> None:
    """/v1/retrieve for a stored user answers with `version` and the scores of `loaded` (model, config) run
    directly on the user's history, seen items excluded (1e-5)."""
    encoder, cfg = loaded
    history = http.get(f"/v1/users/{user}/history", params={"limit": 1000}).json()["events"]
    answer = http.post("/v1/retrieve", json={"user_id": user, "k": 5, "request_time": NOW}).json()
    catalog = {e["item_id"] for e in history}
    assert answer["model"]["version"] == version and not {i["item_id"] for i in answer["items"]} & catalog
    ids = [int(served_item_dense(served, e["item_id"])) for e in history][-cfg.kept_items:]
    ts = [e["timestamp"] for e in history][-cfg.kept_items:]
    with torch.no_grad():
        vector = encoder(torch.tensor(ids), torch.tensor(ts), torch.tensor(ts[1:] + [NOW]),
                         torch.tensor([0, len(ids)]))[-1]
        scores = encoder.all_item_embeddings() @ vector
    scores[0] = -torch.inf
    scores[[int(served_item_dense(served, e["item_id"])) for e in history]] = -torch.inf
    top = torch.topk(scores, 5)
    assert [i["score"] for i in answer["items"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_a_model_folder_on_s3_rolls_out_and_one_on_a_missing_bucket_is_refused_in_one_line(served, s3):
    """No shared disk: a model folder in object storage (a real S3 API server) is a model.uri like any other;
    every replica downloads it with the standard AWS chain. A folder on a bucket that does not exist is
    refused at load in one line naming the key, and the live model keeps answering."""
    http = httpx.Client(base_url=served["url"], timeout=60)
    m = served["m"]
    torch.manual_seed(13)
    uri = f"s3://{BUCKET}/rollout-{uuid.uuid4().hex[:8]}/models/tiny-serve"
    with tempfile.TemporaryDirectory() as tmp:
        upload(save_model_folder(Path(tmp) / "model", m["cfg"], build_model(m["cfg"]).state_dict()), location(uri))
    start(served["tree"](uri))
    info = wait_for(lambda: (i := http.get("/v1/model").json())["rollout"]["target"] == uri and i, 60, "the s3 folder")
    assert info["rollout"]["state"] == "live" and info["version"] == "folder"
    users = http.get("/v1/users", params={"limit": 3}).json()
    retrieval_equals_the_model(served, http, users[0], load_model(uri), "folder")

    missing = f"s3://genrec-no-such-bucket-{uuid.uuid4().hex[:8]}/models/tiny-serve"
    start(served["tree"](missing))
    rollout = wait_for(lambda: (r := http.get("/v1/model").json()["rollout"])["target"] == missing
                       and r["state"] == "failed" and r, 60, "the refusal")
    bucket = missing.split("/")[2]
    assert rollout["error"] == (f"StorageError: model.uri={missing}: not a genrec model folder (the bucket "
                                f"'{bucket}' does not exist)")
    assert rollout["version"] == "folder"
    assert http.post("/v1/recommend", json={"user_id": users[0], "k": 3}).json()["model"]["version"] == "folder"


def test_kill_hup_makes_jobs_serve_apply_its_file_again(served, ray_cluster, tmp_path):
    """jobs/serve.py as a person runs it (its own process, joining this session's Ray cluster, where the app
    runs): it applies its file; after the file names another version, `kill -HUP` rolls that out; a file with a
    typo is reported and changes nothing; Ctrl-C shuts Serve down and exits 0. Last here: it ends the app."""
    http = httpx.Client(base_url=served["url"], timeout=60)
    v1, good = served["v1"].rsplit("/", 1)[1], served["good"].rsplit("/", 1)[1]
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(served["tree"](served["good"])))
    job = subprocess.Popen([sys.executable, "jobs/serve.py", "--config", str(config)], cwd=REPO, text=True,
                           env={**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []

    def read():
        for line in job.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()

    def printed(start: str, after: int = 0):
        """-> a check for the first line from `after` on that starts so; it fails at once if the job exited."""
        def check():
            found = next((x for x in lines[after:] if x.startswith(start)), None)
            if found is None and job.poll() is not None:
                raise AssertionError(f"jobs/serve.py exited ({job.returncode}): {''.join(lines)}")
            return found
        return check

    try:
        wait_for(printed("genrec is serving at"), 90, f"jobs/serve.py to serve; it printed {lines}")
        assert http.get("/v1/model").json()["version"] == good

        config.write_text(yaml.safe_dump(served["tree"](served["v1"])))
        seen = len(lines)
        job.send_signal(signal.SIGHUP)
        wait_for(printed("applied", seen), 60, f"the reload; it printed {lines}")
        info = http.get("/v1/model").json()
        assert info["version"] == v1 and info["rollout"]["state"] == "live" and info["rollout"]["previous"] == good

        typo = served["tree"](served["good"])
        typo["applications"][0]["args"]["retrieval"]["candidats"] = 5
        config.write_text(yaml.safe_dump(typo))
        seen = len(lines)
        job.send_signal(signal.SIGHUP)
        wait_for(printed("not applied", seen), 60, f"the refusal; it printed {lines}")
        wait_for(lambda: "candidats" in "".join(lines[seen:]), 10, f"the refusal to name the key; it printed {lines}")
        assert http.get("/v1/model").json()["version"] == v1

        job.send_signal(signal.SIGINT)
        assert job.wait(60) == 0, lines
    finally:
        if job.poll() is None:
            job.kill()
    assert "shutting down\n" in lines
    with pytest.raises(httpx.TransportError):
        http.get("/healthz")


def served_item_dense(served, raw):
    """Raw item id -> the model's dense index (the vocabulary the tiny model was trained with)."""
    from genrec.data.prepared import read_vocab

    if "dense" not in served:
        items = read_vocab(served["m"]["cfg"].data.output_dir, "items")
        served["dense"] = {str(r): i for r, i in zip(items["item_id"].to_pylist(), items["index"].to_pylist())}
    return served["dense"][str(raw)]
