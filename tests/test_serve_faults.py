"""Killed replicas lose no request. The Serve app as configs/serve/demo.yaml ships it (at least 2 replicas of
each deployment) under a concurrent load of reads and event writes, through genrec's retrying client
(genrec.serve.client), while one replica of each deployment in turn (Ingress, Retrieval, Ranking) is SIGKILLed:
every request gets its answer and every event is stored once. And the client's rules over real HTTP against a
small server that fails on cue: what it resends (a lost answer, only for a request that is safe to repeat), how
often, and what it never resends."""

import asyncio
import collections
import http.server
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
import yaml

from genrec.serve.client import RETRIES_KEY, RetryPolicy, connect, connect_async
from genrec.serve.deploy import DEPLOYMENTS, load_serve_file, replica_processes, start

REPO = Path(__file__).resolve().parents[1]
TOKEN = "faults-test-token-0123456789"
FAST = RetryPolicy(attempts=3, first_wait_s=0.01, max_wait_s=0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the client's rules


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers each path's queued statuses in turn (then 200), and counts what it received."""

    script: dict[str, list[int]] = {}
    received: collections.Counter = collections.Counter()

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received[self.path] += 1
        queued = self.script.get(self.path) or []
        status = queued.pop(0) if queued else 200
        if status == 0:  # the connection closes with no answer, as a dying server's does
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = json.dumps({"status": status}).encode()
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def flaky():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Flaky.script, Flaky.received = {}, collections.Counter()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_client_resends_a_lost_answer_of_a_request_safe_to_repeat(flaky):
    Flaky.script = {"/v1/rank": [500, 503], "/v1/recommend": [0], "/healthz": [502, 504],
                    "/v1/events": [500]}
    with connect(flaky, policy=FAST) as client:
        response = client.post("/v1/rank", json={"user_id": "1", "candidates": ["2"]})
        assert response.status_code == 200 and response.extensions[RETRIES_KEY] == 2
        assert client.post("/v1/recommend", json={"user_id": "1"}).extensions[RETRIES_KEY] == 1
        assert client.get("/healthz").extensions[RETRIES_KEY] == 2
        # every event names its identity (an event_id, or a timestamp): a resend stores nothing twice
        events = {"user_id": "1", "events": [{"item_id": "2", "event_id": "a"}, {"item_id": "3", "timestamp": 5}]}
        assert client.post("/v1/events", json=events).extensions[RETRIES_KEY] == 1
    assert Flaky.received == {"/v1/rank": 3, "/v1/recommend": 2, "/healthz": 3, "/v1/events": 2}


def test_client_never_resends_what_is_not_lost_or_not_safe_to_repeat(flaky):
    Flaky.script = {"/v1/rank": [422], "/v1/retrieve": [408], "/v1/events": [500], "/other": [500],
                    "/v1/recommend": [500, 500, 500, 500]}
    with connect(flaky, policy=FAST) as client:
        assert client.post("/v1/rank", json={}).status_code == 422             # bad input: the answer stands
        assert client.post("/v1/retrieve", json={}).status_code == 408         # slow, not lost
        # an event without event_id or timestamp: the server stamps it, so a resend would store it again
        lost = client.post("/v1/events", json={"user_id": "1", "events": [{"item_id": "2", "event_id": "a"},
                                                                          {"item_id": "3"}]})
        assert lost.status_code == 500 and lost.extensions[RETRIES_KEY] == 0
        assert client.post("/other", json={}).status_code == 500               # not a genrec endpoint
        gave_up = client.post("/v1/recommend", json={"user_id": "1"})          # bounded: 3 sends, then the 500
        assert gave_up.status_code == 500 and gave_up.extensions[RETRIES_KEY] == 2
    assert Flaky.received == {"/v1/rank": 1, "/v1/retrieve": 1, "/v1/events": 1, "/other": 1, "/v1/recommend": 3}
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(attempts=0)


# ----------------------------------------------------------------------------- replicas killed under load


def test_the_shipped_config_keeps_two_replicas_of_each_deployment():
    """One replica of a deployment makes a kill cost seconds (every request waits for the replacement)."""
    tree = yaml.safe_load((REPO / "configs" / "serve" / "demo.yaml").read_text())
    deployments = {d["name"]: d for d in tree["applications"][0]["deployments"]}
    assert set(deployments) == set(DEPLOYMENTS)
    for name, d in deployments.items():
        assert d.get("num_replicas", d.get("autoscaling_config", {}).get("min_replicas", 1)) >= 2, name



@pytest.fixture(scope="module")
def shipped_app(tiny_registered_model, tmp_path_factory):
    """The app with configs/serve/demo.yaml's deployments as they are (replicas, autoscaling): only the model,
    the events file and the token are the test's. -> (base URL, events file)"""
    from ray import serve

    m = tiny_registered_model
    events_db = tmp_path_factory.mktemp("faults") / "events.sqlite"
    tree = load_serve_file(REPO / "configs" / "serve" / "demo.yaml", [
        f"model.uri={m['uri']}", f"model.tracking_uri={m['tracking_uri']}", f"store.events_db={events_db}",
        f"auth.token={TOKEN}", "retrieval.candidates=30"])
    url = start(tree, port=free_port())
    yield url, events_db
    serve.shutdown()


def test_killing_a_replica_of_each_deployment_loses_no_request(shipped_app):
    """300 requests, 8 in flight (/v1/rank, /v1/recommend, and /v1/events with event ids for 10 new users);
    a replica of Ingress, then Retrieval, then Ranking is SIGKILLed as the load passes 1/6, 3/6 and 5/6 of it.
    The Ingress replica is killed while writes are surely in flight on it: the test holds the events file's
    write lock until the other 7 requests are writes waiting for it inside the two Ingress replicas (Serve
    spreads them by queue length). The proxy answers 500 for those on the killed replica and the client sends
    them again (each is safe to repeat); the ingress resends a model call whose replica died. No request is
    lost, and every event is stored once."""
    url, events_db = shipped_app
    with connect(url, timeout_s=60) as http:
        users = http.get("/v1/users", params={"limit": 40}).json()
        items = sorted({e["item_id"] for u in users[:10] for e in http.get(f"/v1/users/{u}/history").json()["events"]})
    victims = {name: replica_processes(name) for name in DEPLOYMENTS}
    assert {name: len(found) for name, found in victims.items()} == {name: 2 for name in DEPLOYMENTS}
    n, concurrency, writers = 300, 8, [f"fault-writer-{w}" for w in range(10)]
    kill_at = {n // 6: "Ingress", n // 2: "Retrieval", 5 * n // 6: "Ranking"}
    statuses, resent, model_retries, posted = (collections.Counter() for _ in range(4))
    writes_in_flight, killed = 0, []

    def request(i: int) -> tuple[str, dict]:  # each worker (i = w, w + 8, ...) writes every third request
        user = users[i % len(users)]
        if i % 3 == 0:
            return "/v1/rank", {"user_id": user, "candidates": items[i % 7:][:20]}
        if i % 3 == 1:
            return "/v1/recommend", {"user_id": user, "k": 5}
        writer = writers[i % len(writers)]
        posted[writer] += 1
        return "/v1/events", {"user_id": writer, "events": [{"item_id": items[i % len(items)],
                                                             "timestamp": 1_600_000_000 + i, "event_id": f"e{i}"}]}

    async def kill(name: str) -> None:
        if name != "Ingress":
            os.kill(victims[name][0].pid, signal.SIGKILL)
        else:
            with closing(sqlite3.connect(events_db, timeout=30, isolation_level=None)) as db:
                db.execute("BEGIN IMMEDIATE")  # writers wait for it (their busy timeout is 30 s); readers do not
                deadline = time.time() + 15
                while writes_in_flight < concurrency - 1 and time.time() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2)  # past the proxy, into the replicas' store calls
                os.kill(victims[name][0].pid, signal.SIGKILL)
                db.execute("ROLLBACK")
        killed.append(name)

    async def load():
        nonlocal writes_in_flight
        done = 0
        async with connect_async(url, token=TOKEN, timeout_s=60, max_connections=concurrency) as client:
            async def worker(w):
                nonlocal done, writes_in_flight
                for i in range(w, n, concurrency):
                    path, body = request(i)
                    writes_in_flight += path == "/v1/events"
                    response = await client.post(path, json=body)
                    writes_in_flight -= path == "/v1/events"
                    statuses[response.status_code] += 1
                    resent[path] += response.extensions[RETRIES_KEY]
                    model_retries[path] += int(response.headers.get("x-genrec-retries", 0))
                    done += 1
                    if done in kill_at:  # the other workers' requests are in flight now
                        await kill(kill_at[done])
            await asyncio.gather(*(worker(w) for w in range(concurrency)))

    asyncio.run(load())
    assert killed == list(DEPLOYMENTS)
    assert statuses == {200: n}, statuses
    assert resent["/v1/events"] >= 1, resent  # what the proxy answered 500 for, on the killed Ingress replica
    with connect(url) as http:
        stored = {w: len(http.get(f"/v1/users/{w}/history", params={"limit": 100}).json()["events"]) for w in writers}
    assert stored == dict(posted)
    print(f"replicas killed: Ingress, Retrieval, Ranking; {n} requests, 0 lost; sent again by the client "
          f"{dict(resent)}; model calls sent again by the ingress {dict(model_retries)}")
