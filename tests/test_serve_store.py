"""The history stores with a real redis-server (started here, durable: AOF fsynced at every write) and a
real sqlite file: appends round-trip, a retried write (the same event ids, or the same item, action and
timestamp) is a no-op that answers as the first one did, also when two processes write it at once; two
processes see each other's writes at once; a SIGKILLed Redis restarted on its files has every acknowledged
event; an old events file is migrated; the durability check warns, naming the setting; and through the Serve
app with two ingress replicas over Redis, every request sees the events written before it."""

import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from genrec.config import ConfigError
from genrec.data.prepared import data_location, read_manifest, read_split, read_vocab
from genrec.errors import GenrecError
from genrec.serve.deploy import load_serve_file, start
from genrec.serve.redis_store import RedisHistoryStore
from genrec.serve.model import ItemIds
from genrec.serve.store import Appended, EmbeddedHistoryStore, StoreUnavailable

REPO = Path(__file__).resolve().parents[1]
TOKEN = "store-test-token-0123456789"
REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="Debian's redis-server is not installed "
                                "(apt-get install redis-server; .ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on 127.0.0.1, its data in `folder`: durable (AOF, appendfsync always) unless told
    otherwise by `settings`."""

    DURABLE = ("--appendonly", "yes", "--appendfsync", "always")

    def __init__(self, folder: Path, *settings: str, password: str | None = None) -> None:
        self.folder, self.port, self.password = folder, free_port(), password
        self.settings = settings or self.DURABLE
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{f':{self.password}@' if self.password else ''}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        auth = ("--requirepass", self.password) if self.password else ()
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "",
             "--logfile", str(self.folder / "redis.log"), *self.settings, *auth])
        client = redis.Redis.from_url(self.url)
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert self.process.poll() is None and time.time() < deadline, (
                    f"redis-server did not start: {(self.folder / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def world(tiny_registered_model):
    """The tiny registered model's prepared data: its users' base histories, raw user id -> (items, version)."""
    data = tiny_registered_model["cfg"].data.output_dir
    users = read_vocab(data, "users")
    raw = dict(zip(users["index"].to_pylist(), users["user_id"].to_pylist()))
    seq = read_split(data, "sequences")
    return data, {str(raw[u]): np.asarray(i) for u, i in zip(seq["user"].to_pylist(), seq["items"].to_pylist())}


def open_store(kind: str, data, tmp_path: Path, redis_server: RedisServer, prefix: str):
    if kind == "embedded":
        return EmbeddedHistoryStore(data, tmp_path / "events.sqlite")
    return RedisHistoryStore(data, redis_server.url, prefix=prefix)


def events(*rows):
    return tuple(np.asarray(column, dtype=np.int64) for column in zip(*rows))


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_appends_round_trip_and_a_retry_stores_nothing(kind, world, tmp_path, redis_server):
    data, base = world
    store = open_store(kind, data, tmp_path, redis_server, prefix=f"t-{uuid.uuid4().hex}")
    user = min(base, key=lambda u: len(base[u]))
    n = len(base[user])
    assert store.history(user).version == n and store.history("nobody") is None
    # held in 32 bits (at 100M events: 0.8 GB less per ingress replica), handed out as int64
    assert all(a.dtype == np.int64 for a in (store.history(user).items, store.history(user).actions))
    assert store.history(user).items.tolist() == base[user].tolist()

    first = store.append(user, *events((5, 1, 100), (6, 1, 101)), ["a", "b"])
    assert first == Appended(2, n + 2)
    history = store.history(user)
    assert history.version == n + 2 and history.items.tolist() == [*base[user], 5, 6]
    assert history.timestamps[-2:].tolist() == [100, 101] and history.actions[-2:].tolist() == [1, 1]
    assert store.append(user, *events((7, 1, 102)), ["c"]) == Appended(1, n + 3)
    # retried after a later write: nothing stored, the first answer again; the id is the identity (not the content)
    assert store.append(user, *events((5, 1, 100), (6, 1, 101)), ["a", "b"]) == first
    assert store.append(user, *events((9, 1, 999)), ["b"]) == Appended(1, n + 2)
    # a retry that adds an event stores only the new one
    assert store.append(user, *events((6, 1, 101), (8, 1, 103)), ["b", "d"]) == Appended(2, n + 4)
    assert store.history(user).items.tolist() == [*base[user], 5, 6, 7, 8]

    # without ids the (item, action, timestamp) is the identity: a repeat inside one write counts once
    no_ids = events((10, 1, 200), (10, 1, 200), (10, 1, 201))
    assert store.append(user, *no_ids) == Appended(2, n + 6)
    assert store.append(user, *no_ids) == Appended(2, n + 6)
    assert store.append(user, *events((10, 1, 200))) == Appended(1, n + 5)
    assert store.history(user).items.tolist() == [*base[user], 5, 6, 7, 8, 10, 10]

    # identities are the user's: another (new) user may use the same ids
    assert store.append("new-user", *events((5, 1, 100)), ["a"]) == Appended(1, 1)
    assert store.history("new-user").items.tolist() == [5] and store.history("new-user").context == ()
    assert store.users(3) == list(base)[:3]
    assert store.item_counts().sum() == sum(len(b) for b in base.values())  # the prepared table's only


CHILD = """
import json, sys
import numpy as np
from genrec.serve.redis_store import RedisHistoryStore
from genrec.serve.store import EmbeddedHistoryStore
kind, data, where, prefix = sys.argv[1:5]
store = EmbeddedHistoryStore(data, where) if kind == "embedded" else RedisHistoryStore(data, where, prefix=prefix)
print("ready", flush=True)
for line in sys.stdin:
    op = json.loads(line)
    if op["op"] == "append":
        rows = np.asarray(op["rows"], dtype=np.int64).reshape(-1, 3)
        print(json.dumps(list(store.append(op["user"], rows[:, 0], rows[:, 1], rows[:, 2], op["ids"]))), flush=True)
    else:
        print(json.dumps(store.history(op["user"]).items.tolist()), flush=True)
"""


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_two_processes_see_each_others_writes_and_store_a_simultaneous_retry_once(kind, world, tmp_path,
                                                                                 redis_server):
    """Another process (as another replica is) reads this one's writes at once and the other way round; both
    writing the same retry at the same moment, 20 times over, store each event once and answer alike."""
    data, base = world
    prefix = f"t-{uuid.uuid4().hex}"
    store = open_store(kind, data, tmp_path, redis_server, prefix)
    where = str(tmp_path / "events.sqlite") if kind == "embedded" else redis_server.url
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(data), where, prefix], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "ready"

        def ask(op: dict):
            child.stdin.write(json.dumps(op) + "\n")
            child.stdin.flush()
            return json.loads(child.stdout.readline())

        user = max(base, key=lambda u: len(base[u]))
        store.append(user, *events((3, 1, 500)), ["mine"])
        assert ask({"op": "history", "user": user})[-1] == 3
        ask({"op": "append", "user": user, "rows": [[4, 1, 501]], "ids": ["theirs"]})
        assert store.history(user).items[-2:].tolist() == [3, 4]

        answers = []
        for round_ in range(20):
            rows = [[11 + round_, 1, 600 + round_], [12 + round_, 1, 600 + round_]]
            ids = [f"r{round_}-0", f"r{round_}-1"]
            child.stdin.write(json.dumps({"op": "append", "user": user, "rows": rows, "ids": ids}) + "\n")
            child.stdin.flush()
            mine = store.append(user, *events(*rows), ids)
            answers.append((list(mine), json.loads(child.stdout.readline())))
        assert all(mine == theirs for mine, theirs in answers), answers
        assert ask({"op": "history", "user": user}) == store.history(user).items.tolist()
        logged = store.history(user).items[len(base[user]) + 2:].tolist()
        assert logged == [x for r in range(20) for x in (11 + r, 12 + r)]  # each event once, in write order
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_a_killed_redis_restarted_on_its_files_has_every_acknowledged_event(world, tmp_path):
    """SIGKILL (no shutdown, no final save) right after the last acknowledged write: with appendfsync always
    every acknowledged event is in the AOF the restarted server reads. (A crash of the host, which a test
    cannot make, is what `always` adds over `everysec`: the fsync before each answer.)"""
    data, base = world
    server = RedisServer(tmp_path / "redis")
    try:
        store = RedisHistoryStore(data, server.url, prefix="durable")
        answers = [store.append("writer", *events((1 + i % 100, 1, 1000 + i)), [f"e{i}"]) for i in range(200)]
        assert answers[-1] == Appended(1, 200)
        server.kill()
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{server.port}"):
            store.history("writer")
        server.start()  # the same port and folder
        history = store.history("writer")  # the same store: its client reconnects
        assert history.items.tolist() == [1 + i % 100 for i in range(200)]
        assert history.timestamps.tolist() == [1000 + i for i in range(200)]
        assert store.append("writer", *events((1, 1, 1000)), ["e0"]) == Appended(1, 1)  # identities survived too
        assert store.history("writer").version == 200
    finally:
        server.kill()


def test_the_durability_check_warns_once_naming_the_setting_and_never_logs_credentials(world, tmp_path, caplog):
    data, _ = world
    caplog.set_level(logging.WARNING, logger="genrec.serve")
    password = "s3cret-pass-0123"
    servers = [RedisServer(tmp_path / "no-aof", "--appendonly", "no", password=password),
               RedisServer(tmp_path / "everysec", "--appendonly", "yes", "--appendfsync", "everysec"),
               RedisServer(tmp_path / "no-config", *RedisServer.DURABLE, "--rename-command", "CONFIG", "")]
    try:
        no_aof, everysec, no_config = servers
        RedisHistoryStore(data, no_aof.url)
        RedisHistoryStore(data, no_aof.url)  # another store (a rollout): no second warning
        [warning] = [r.getMessage() for r in caplog.records]
        assert f"redis://***@127.0.0.1:{no_aof.port}/0 runs with appendonly no" in warning
        assert "every event since the last RDB snapshot" in warning and password not in caplog.text

        caplog.clear()
        RedisHistoryStore(data, everysec.url, durability="everysec")  # what it runs with: no warning
        assert not caplog.records
        RedisHistoryStore(data, everysec.url, durability="always")
        [warning] = [r.getMessage() for r in caplog.records]
        assert "runs with appendfsync everysec" in warning and "up to about 2 s" in warning

        caplog.clear()
        RedisHistoryStore(data, no_config.url)
        [warning] = [r.getMessage() for r in caplog.records]
        assert "refuses CONFIG GET" in warning and "assumed, not verified" in warning
    finally:
        for server in servers:
            server.kill()

    with pytest.raises(StoreUnavailable, match=f"store at redis://\\*\\*\\*@127.0.0.1:{no_aof.port}/0 is unreachable"):
        RedisHistoryStore(data, no_aof.url)
    with pytest.raises(ConfigError, match="store.redis_url") as bad:
        RedisHistoryStore(data, f"http://user:{password}@127.0.0.1:1/0")
    assert password not in str(bad.value)


OLD_SCHEMA = ("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, item INTEGER NOT NULL,"
              " action INTEGER NOT NULL, timestamp INTEGER NOT NULL)")


def test_an_events_file_of_the_old_schema_is_migrated_and_a_foreign_one_refused(world, tmp_path, caplog):
    import sqlite3

    data, _ = world
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:  # as the store wrote before events were idempotent: a duplicate stored twice
        db.execute(OLD_SCHEMA)
        db.executemany("INSERT INTO events (user, item, action, timestamp) VALUES (?, ?, ?, ?)",
                       [("u", 5, 1, 100), ("u", 5, 1, 100), ("u", 6, 1, 101)])
    store = EmbeddedHistoryStore(data, old)
    assert f"{old}: events log migrated" in caplog.text
    assert store.history("u").items.tolist() == [5, 5, 6]  # the history served before stays
    assert store.append("u", *events((6, 1, 101))) == Appended(1, 3)  # an old event's retry: not stored again
    assert store.append("u", *events((7, 1, 102)), ["x"]) == Appended(1, 4)
    assert EmbeddedHistoryStore(data, old).history("u").items.tolist() == [5, 5, 6, 7]  # reopened: as it is

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE events (id INTEGER, payload TEXT)")
    with pytest.raises(GenrecError, match=f"{foreign}: table events has columns \\['id', 'payload'\\], not a genrec"):
        EmbeddedHistoryStore(data, foreign)
    not_sqlite = tmp_path / "notes.sqlite"
    not_sqlite.write_text("not a database, but long enough to look like a header: " * 4)
    with pytest.raises(GenrecError, match=f"{not_sqlite}: not a usable events log"):
        EmbeddedHistoryStore(data, not_sqlite)


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_events_on_items_this_version_does_not_know_are_not_history(kind, world, tmp_path, redis_server):
    """A dense id past this version's vocabulary (logged by a grown version, read after a rollback to this one)
    stays out of the history, and out of its length; the embedded store logs a new item by its raw id for the
    next refresh (genrec.train.refresh), the redis store refuses it."""
    data, base = world
    store = open_store(kind, data, tmp_path, redis_server, prefix=f"new-{uuid.uuid4().hex}")
    user = min(base, key=lambda u: len(base[u]))
    n, num_items = len(base[user]), read_manifest(data)["num_items"]
    assert store.append(user, *events((num_items + 1, 1, 100), (5, 1, 101))) == Appended(2, n + 1)
    assert store.history(user).items.tolist() == [*base[user], 5]
    if kind == "redis":
        with pytest.raises(GenrecError, match="does not log events on items the model does not know"):
            store.append(user, *events((0, 1, 102)), new_items=["brand-new"])
        return
    first = store.append(user, *events((0, 1, 102), (0, 1, 102)), new_items=["brand-new", "other-new"])
    assert first == Appended(2, n + 1)  # two items at one time: two events (their raw ids tell them apart)
    assert store.append(user, *events((0, 1, 102)), new_items=["brand-new"]) == Appended(1, n + 1)  # a retry
    assert store.history(user).items.tolist() == [*base[user], 5]


# ---------------------------------------------------------------------------- through the Serve app

@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_a_log_of_other_prepared_data_is_refused_naming_it(kind, world, tmp_path, redis_server):
    """Dense ids mean items only under the vocabulary they were written with (an earlier demo's world had
    5,000 items, the next 2,000: its log named items the new catalog lacks)."""
    data, _ = world
    prefix = f"vocab-{uuid.uuid4().hex}"
    open_store(kind, data, tmp_path, redis_server, prefix).append("7", *events((3, 0, 100)))
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    vocab = data_location(other) / "vocab" / "items.parquet"
    items = read_vocab(other, "items")
    pq.write_table(items.slice(0, items.num_rows - 1), vocab.path)  # another vocabulary
    with pytest.raises(GenrecError, match="written for other prepared data"):
        open_store(kind, other, tmp_path, redis_server, prefix)
    assert open_store(kind, data, tmp_path, redis_server, prefix).history("7") is not None  # its own data: fine


@pytest.fixture(scope="module")
def app(tiny_registered_model, redis_server, tmp_path_factory):
    """The Serve app with its histories in Redis and two ingress replicas (two processes)."""
    from ray import serve

    m = tiny_registered_model
    prefix = f"app-{uuid.uuid4().hex}"
    tree = load_serve_file(REPO / "configs" / "serve" / "demo.yaml", [
        f"model.uri={m['uri']}", f"model.tracking_uri={m['tracking_uri']}", f"auth.token={TOKEN}",
        "store.kind=redis", f"store.redis_url={redis_server.url}", f"store.redis_prefix={prefix}",
        f"store.events_db={tmp_path_factory.mktemp('serve-store') / 'events.sqlite'}",
        "deployments.Ingress.num_replicas=2", "deployments.Ingress.autoscaling_config=null",
        # one of each model deployment: what this tests is the ingress's store, and the suite runs on 2 cores
        *(f"deployments.{d}.{key}" for d in ("Retrieval", "Ranking")
          for key in ("num_replicas=1", "autoscaling_config=null"))])
    url = start(tree, port=free_port())
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield http, prefix
    serve.shutdown()


def ingress_replica_of() -> dict[str, str]:
    """request id -> the ingress replica that answered it, from the replicas' access logs."""
    import ray

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    answered = {}
    for log in (session / "logs" / "serve").glob("replica_genrec_Ingress_*.log"):
        for replica, request in re.findall(r"genrec_Ingress (\S+) (\S+) -- ", log.read_text()):
            answered[request] = replica
    return answered


def test_every_request_sees_the_events_before_it_whatever_ingress_replica_answers(app, world, redis_server):
    http, prefix = app
    _, base = world
    user = sorted(base)[0]
    items = http.get(f"/v1/users/{user}/history", params={"limit": 1000}).json()["events"]
    catalog = [e["item_id"] for e in items]
    n, now = len(base[user]), int(time.time())
    pairs = []  # (the write's request id, a read's request id)
    for i in range(12):  # the write and the reads go to either replica (Serve routes each request on its own)
        item = catalog[i % len(catalog)]
        written = http.post("/v1/events", json={"user_id": user, "events": [
            {"item_id": item, "timestamp": now + i, "event_id": f"click-{i}"}]})
        assert written.json() == {"user_id": user, "appended": 1, "history_length": n + i + 1, "new_items": []}
        shown = http.get(f"/v1/users/{user}/history", params={"limit": 1})
        assert [(e["item_id"], e["timestamp"]) for e in shown.json()["events"]] == [(item, now + i)]
        answer = http.post("/v1/retrieve", json={"user_id": user, "k": 3})
        assert answer.json()["history_used"] == min(n + i + 1, 16)
        pairs += [(written.headers["x-request-id"], read.headers["x-request-id"]) for read in (shown, answer)]
    time.sleep(1)  # the access log lines are written after the answer
    replica = ingress_replica_of()
    assert len({replica[r] for pair in pairs for r in pair}) == 2
    assert any(replica[w] != replica[r] for w, r in pairs)  # a read answered by the other process than its write
    assert redis.Redis.from_url(redis_server.url).llen(f"{prefix}:{{{user}}}:log") == 12


def test_a_retried_post_answers_the_same_and_stores_once(app, world, redis_server):
    http, prefix = app
    _, base = world
    user = sorted(base)[1]
    n = len(base[user])
    catalog = [e["item_id"] for e in http.get(f"/v1/users/{user}/history", params={"limit": 3}).json()["events"]]
    with_ids = {"user_id": user, "events": [{"item_id": catalog[0], "event_id": "view-1"},  # timestamp: now
                                            {"item_id": catalog[1], "event_id": "view-2"}]}
    by_key = {"user_id": user, "events": [{"item_id": catalog[2], "timestamp": int(time.time())}]}
    first = [http.post("/v1/events", json=body).json() for body in (with_ids, by_key)]
    assert first == [{"user_id": user, "appended": 2, "history_length": n + 2, "new_items": []},
                     {"user_id": user, "appended": 1, "history_length": n + 3, "new_items": []}]
    time.sleep(1.1)  # a retry of with_ids gets another request time: the ids still make it the same event
    again = [http.post("/v1/events", json=body).json() for body in (with_ids, by_key) for _ in range(2)]
    assert again == [first[0], first[0], first[1], first[1]]
    history = http.get(f"/v1/users/{user}/history", params={"limit": 1000}).json()["events"]
    assert len(history) == n + 3
    assert redis.Redis.from_url(redis_server.url).llen(f"{prefix}:{{{user}}}:log") == 3


def test_with_redis_down_every_route_that_needs_it_answers_503_then_recovers(app, world, redis_server):
    """Last in the module: it stops the module's redis-server (and starts it again on its files)."""
    http, _ = app
    _, base = world
    user = sorted(base)[2]
    redis_server.kill()
    try:
        for method, path, body in (("POST", "/v1/retrieve", {"user_id": user, "k": 3}),
                                   ("POST", "/v1/recommend", {"user_id": user, "k": 3}),
                                   ("GET", f"/v1/users/{user}/history", None),
                                   ("POST", "/v1/events", {"user_id": user, "events": [{"item_id": 1, "timestamp": 5}]})):
            answer = http.request(method, path, json=body)
            assert answer.status_code == 503, (path, answer.text)
            assert answer.json()["detail"][0]["type"] == "store_unavailable", answer.text
    finally:
        redis_server.start()
    assert http.post("/v1/retrieve", json={"user_id": user, "k": 3}).status_code == 200


def test_item_ids_find_raw_ids_as_text_in_arrays():
    """The ingress's raw <-> dense item ids, held in arrays (a dict of a 4M-item catalog took most of a GiB a
    replica): 7 and "7" are one id, an unknown id is None, and a dense id with no raw id (a gap) is None."""
    ids = ItemIds(np.array([2, 1, 4]), pa.chunked_array([pa.array(["b10", "7", "x"])]), num_items=5)
    assert [ids.dense(r) for r in ("7", 7, "b10", "x", "8", "")] == [1, 1, 2, 4, None, None]
    assert [ids.raw(d) for d in range(7)] == [None, "7", "b10", None, "x", None, None]
    same = ItemIds(np.array([1, 2, 4]), pa.chunked_array([pa.array(["7", "b10", "x"])]), num_items=5)
    assert ids == same and ids != ItemIds(np.array([1, 2, 4]), pa.chunked_array([pa.array(["7", "b10", "y"])]), 5)
