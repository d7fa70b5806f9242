"""The Serve app over real HTTP on 127.0.0.1, on a tiny model trained and registered in MLflow
(tests/conftest.py): answers checked against the model run directly, cold start, limits and bad
input (never a 500; the schema fuzzer with all its checks is in test_serve_api.py), auth on writes,
persisted events, M-FALCON's user cache extended by events."""

import asyncio
import collections
import dataclasses
import json
import socket
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import fixed_replicas
from genrec.artifact import load_model
from genrec.config import ConfigError
from genrec.data.prepared import read_split, read_vocab
from genrec.serve import schemas
from genrec.serve.deploy import load_serve_file, start
from genrec.serve.store import EmbeddedHistoryStore

REPO = Path(__file__).resolve().parents[1]
TOKEN = "serve-test-token-0123456789"
NOW = 1_700_000_000  # a fixed request time: answers are deterministic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, url, model, events_db):
        self.url, self.model, self.events_db = url, model, events_db
        self.http = httpx.Client(base_url=url, timeout=60)
        data = model["cfg"].data.output_dir
        self.data = data
        users = read_vocab(data, "users")
        items = read_vocab(data, "items")
        self.user_raw = dict(zip(users["index"].to_pylist(), users["user_id"].to_pylist()))
        self.item_raw = dict(zip(items["index"].to_pylist(), items["item_id"].to_pylist()))
        self.item_dense = {v: k for k, v in self.item_raw.items()}
        seq = read_split(data, "sequences")
        self.histories = {self.user_raw[u]: (np.asarray(i), np.asarray(t)) for u, i, t in
                          zip(seq["user"].to_pylist(), seq["items"].to_pylist(), seq["timestamps"].to_pylist())}

    def post(self, path, body, **kw):
        return self.http.post(path, json=body, **kw)

    def user_with(self, shortest: bool):
        """A user with the shortest (or longest) history."""
        pick = min if shortest else max
        return pick(self.histories, key=lambda u: len(self.histories[u][0]))


@pytest.fixture(scope="module")
def app(tiny_registered_model, tmp_path_factory):
    from ray import serve

    m = tiny_registered_model
    events_db = tmp_path_factory.mktemp("serve") / "events.sqlite"
    tree = load_serve_file(REPO / "configs" / "serve" / "demo.yaml", [
        f"model.uri={m['uri']}", f"model.tracking_uri={m['tracking_uri']}", f"store.events_db={events_db}",
        f"auth.token={TOKEN}", "retrieval.candidates=30",
        # two Ranking replicas: one is killed under load (test_a_killed_model_replica_loses_no_request); one
        # Retrieval replica: the cache states asserted are that replica's
        *fixed_replicas(ranking=2)])
    url = start(tree, port=free_port())
    yield Served(url, m, events_db)
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(app):
    """The registered model loaded directly (no Serve, no M-FALCON): what the answers must equal."""
    encoder, cfg = load_model(app.model["uri"], app.model["tracking_uri"])
    n_max = cfg.kept_items
    items = encoder.all_item_embeddings().detach()

    def user_vector(item_ids, stamps, request_time=NOW):
        ids, ts = torch.as_tensor(item_ids[-n_max:]), torch.as_tensor(stamps[-n_max:])
        target = torch.cat([ts[1:], torch.tensor([request_time])])
        with torch.no_grad():
            return encoder(ids, ts, target, torch.tensor([0, len(ids)]))[-1]

    return user_vector, items, n_max


def test_health_model_info_and_docs(app):
    assert app.http.get("/healthz").json() == {"status": "ok", "model": {"name": "tiny-serve",
                                                                          "version": app.model["version"]}}
    info = app.http.get("/v1/model").json()
    client = MlflowClient(app.model["tracking_uri"])
    assert info["run_id"] == client.get_model_version("tiny-serve", app.model["version"]).run_id
    assert info["metrics"]["best/test/ndcg_at_10"] == pytest.approx(
        client.get_run(info["run_id"]).data.metrics["best/test/ndcg_at_10"])
    assert info["tasks"] == ["retrieval"] and info["max_seq_len"] == 16 and info["num_items"] == 120
    assert app.http.get("/docs").status_code == 200
    paths = app.http.get("/openapi.json").json()["paths"]
    assert {"/v1/retrieve", "/v1/rank", "/v1/recommend", "/v1/events", "/healthz", "/v1/model"} <= set(paths)


def test_retrieve_equals_the_model_run_directly(app, reference):
    user_vector, items, n_max = reference
    for user in (app.user_with(shortest=True), app.user_with(shortest=False)):
        answer = app.post("/v1/retrieve", {"user_id": user, "k": 10, "request_time": NOW}).json()
        hist, stamps = app.histories[user]
        scores = items @ user_vector(hist, stamps)
        scores[0] = -torch.inf
        scores[torch.as_tensor(hist)] = -torch.inf  # the whole history is excluded, not only the last N
        top = torch.topk(scores, 10)
        assert [i["item_id"] for i in answer["items"]] == [app.item_raw[d] for d in top.indices.tolist()]
        assert [i["score"] for i in answer["items"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert answer["model"] == {"name": "tiny-serve", "version": app.model["version"]}
        assert answer["history_used"] == min(len(hist), n_max) and not answer["cold_start"]


def test_rank_scores_candidates_and_reports_unknown_ones(app, reference):
    user_vector, items, _ = reference
    user = app.user_with(shortest=False)
    candidates = [app.item_raw[d] for d in range(1, 41)]
    answer = app.post("/v1/rank", {"user_id": user, "candidates": candidates + [10**9], "request_time": NOW}).json()
    expected = items[[app.item_dense[c] for c in candidates]] @ user_vector(*app.histories[user])
    got = {i["item_id"]: i["score"] for i in answer["items"]}
    assert got == pytest.approx(dict(zip(candidates, expected.tolist())), abs=1e-5)
    assert [i["score"] for i in answer["items"]] == sorted(got.values(), reverse=True)  # best first
    assert all(i["scores"] == {"retrieval": i["score"]} for i in answer["items"])
    assert answer["unknown_items"] == [10**9]
    # permuting the candidates permutes nothing but the input
    again = app.post("/v1/rank", {"user_id": user, "candidates": candidates[::-1], "request_time": NOW}).json()
    assert {i["item_id"]: i["score"] for i in again["items"]} == pytest.approx(got, abs=1e-6)


def test_recommend_returns_the_best_ranked_with_metadata(app):
    user = app.user_with(shortest=False)
    answer = app.post("/v1/recommend", {"user_id": user, "k": 5, "request_time": NOW}).json()
    top = app.post("/v1/retrieve", {"user_id": user, "k": 5, "request_time": NOW}).json()
    # the items-only model ranks by the retrieval score itself: the same five, in the same order
    assert [i["item_id"] for i in answer["items"]] == [i["item_id"] for i in top["items"]]
    assert all(i["genres"] and i["scores"] for i in answer["items"])
    assert not set(i["item_id"] for i in answer["items"]) & set(app.item_raw[d] for d in app.histories[user][0])


def test_unknown_user_gets_popular_items_flagged(app):
    counts = np.bincount(np.concatenate([h for h, _ in app.histories.values()]))
    counts[0] = 0
    popular = [app.item_raw[d] for d in np.argsort(-counts, kind="stable")[:5]]
    for path in ("/v1/recommend", "/v1/retrieve"):
        answer = app.post(path, {"user_id": "nobody-ever", "k": 5}).json()
        assert answer["cold_start"] is True and [i["item_id"] for i in answer["items"]] == popular
    empty = app.post("/v1/retrieve", {"history": [], "k": 3}).json()
    assert empty["cold_start"] and len(empty["items"]) == 3


def test_a_history_longer_than_n_uses_the_most_recent_n(app, reference):
    user_vector, items, n_max = reference
    rng = np.random.default_rng(0)
    dense = rng.integers(1, 121, size=3 * n_max)
    stamps = NOW - 1000 + np.arange(len(dense)) * 10
    history = [{"item_id": app.item_raw[int(d)], "timestamp": int(t)} for d, t in zip(dense, stamps)]
    answer = app.post("/v1/rank", {"history": history, "candidates": [app.item_raw[1]], "request_time": NOW}).json()
    assert answer["history_used"] == n_max
    assert answer["items"][0]["score"] == pytest.approx(float(items[1] @ user_vector(dense, stamps)), abs=1e-5)


@pytest.mark.parametrize("body, status", [
    ("{not json", 422),
    ('{"user_id": 1, "k": "ten"}', 422),
    ('{"user_id": 1, "k": -1}', 422),
    ('{"user_id": 1, "k": 1000000000000}', 422),
    ('{"user_id": 1, "k": 3, "history": []}', 422),  # both a user and a history
    ('{"k": 3}', 422),  # neither
    ('{"user_id": 1, "k": 3, "surprise": 1}', 422),
    ('[1, 2]', 422),
    ('{"user_id": 1, "k": 3, "request_time": -5}', 422),
])
def test_bad_retrieve_requests_are_4xx_naming_the_field(app, body, status):
    response = app.http.post("/v1/retrieve", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_limits_on_candidates_and_bodies(app):
    user = app.user_with(shortest=True)
    assert app.post("/v1/rank", {"user_id": user, "candidates": []}).status_code == 422
    too_many = app.post("/v1/rank", {"user_id": user, "candidates": [1] * (schemas.MAX_CANDIDATES + 1)})
    assert too_many.status_code == 422 and "candidates" in too_many.text
    big = json.dumps({"user_id": user, "candidates": [1], "pad": "x" * schemas.MAX_BODY_BYTES})
    assert app.http.post("/v1/rank", content=big, headers={"content-type": "application/json"}).status_code == 413
    chunked = app.http.post("/v1/rank", content=iter([big.encode()]), headers={"content-type": "application/json"})
    assert chunked.status_code == 413  # no content-length: counted while streaming
    bad_task = app.post("/v1/rank", {"user_id": user, "candidates": [1], "tasks": ["ctr"]})
    assert bad_task.status_code == 422 and "ctr" in bad_task.text


def test_events_need_the_token_are_seen_next_and_extend_the_cache(app, reference):
    user_vector, _, n_max = reference
    user = app.user_with(shortest=True)
    hist, stamps = app.histories[user]
    assert len(hist) + 2 <= n_max  # the cached history can be extended, not only rebuilt
    first = app.post("/v1/retrieve", {"user_id": user, "k": 5, "request_time": NOW}).json()
    assert first["cache"] in ("miss", "hit")
    assert app.post("/v1/retrieve", {"user_id": user, "k": 5, "request_time": NOW}).json()["cache"] == "hit"
    new = [{"item_id": first["items"][0]["item_id"], "action": "like", "timestamp": int(stamps[-1]) + 60},
           {"item_id": first["items"][1]["item_id"], "timestamp": int(stamps[-1]) + 120}]
    event = {"user_id": user, "events": new}
    assert app.post("/v1/events", event).status_code == 401
    assert app.post("/v1/events", event, headers={"Authorization": "Bearer wrong-token-xxxxxxxxxx"}).status_code == 401
    # an item the model does not know: logged for the next refresh and named, never silently dropped; not history
    unknown = app.post("/v1/events", {"user_id": user, "events": [{"item_id": 10**9, "timestamp": int(stamps[-1]) + 30}]},
                       headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert unknown == {"user_id": user, "appended": 1, "history_length": len(hist), "new_items": [10**9]}
    written = app.post("/v1/events", event, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert written == {"user_id": user, "appended": 2, "history_length": len(hist) + 2, "new_items": []}
    after = app.post("/v1/retrieve", {"user_id": user, "k": 5, "request_time": NOW}).json()
    assert after["cache"] == "extended" and after["history_used"] == len(hist) + 2
    seen = {i["item_id"] for i in after["items"]}
    assert not seen & {e["item_id"] for e in new}  # the new events are history now: excluded
    # the extended cache answers as a fresh encoding of the same history does
    full = [{"item_id": app.item_raw[int(d)], "timestamp": int(t)} for d, t in zip(hist, stamps)] + new
    fresh = app.post("/v1/retrieve", {"history": full, "k": 5, "request_time": NOW}).json()
    assert fresh["cache"] == "none"
    assert [i["item_id"] for i in fresh["items"]] == [i["item_id"] for i in after["items"]]
    assert [i["score"] for i in fresh["items"]] == pytest.approx([i["score"] for i in after["items"]], abs=1e-5)
    shown = app.http.get(f"/v1/users/{user}/history", params={"limit": 2}).json()["events"]
    assert [(e["item_id"], e["action"]) for e in shown] == [(new[0]["item_id"], "like"),
                                                            (new[1]["item_id"], "click")]
    # persisted: another process's store over the same files sees them (the app's restart reads the same)
    store = EmbeddedHistoryStore(app.data, app.events_db)
    assert store.history(str(user)).items[-2:].tolist() == [app.item_dense[e["item_id"]] for e in new]


def test_a_new_user_becomes_known_through_events(app):
    item = app.item_raw[3]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert app.post("/v1/events", {"user_id": "fresh-user", "events": [{"item_id": item}]},
                    headers=headers).status_code == 200
    answer = app.post("/v1/retrieve", {"user_id": "fresh-user", "k": 3}).json()
    assert not answer["cold_start"] and answer["history_used"] == 1
    assert item not in [i["item_id"] for i in answer["items"]]


def test_a_killed_model_replica_loses_no_request(app):
    """One of the two Ranking replicas is SIGKILLed while /v1/rank requests are in flight: every request
    still gets its answer (the ingress retries a model call whose replica died, on the other one)."""
    victims = [p for p in psutil.Process().children(recursive=True)
               if "ServeReplica:genrec:Ranking" in " ".join(p.cmdline())]
    assert len(victims) == 2
    users = sorted(app.histories, key=str)[:40]
    candidates = [app.item_raw[d] for d in range(1, 65)]
    statuses, retried, done = collections.Counter(), [], []

    async def load(n=240, concurrency=8):
        async with httpx.AsyncClient(base_url=app.url, timeout=60) as client:
            async def worker(w):
                for i in range(w, n, concurrency):
                    response = await client.post("/v1/rank", json={"user_id": users[i % len(users)],
                                                                   "candidates": candidates})
                    statuses[response.status_code] += 1
                    retried.append(int(response.headers.get("x-genrec-retries", 0)))
                    done.append(i)
                    if len(done) == n // 4:
                        victims[0].kill()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))

    asyncio.run(load())
    assert not victims[0].is_running() or victims[0].status() == psutil.STATUS_ZOMBIE
    assert statuses == {200: 240}, statuses
    print(f"replica killed after 60 of 240 requests: 0 lost, {sum(retried)} model calls retried")


def test_bad_serve_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="batching.max_batch_sise: unknown key"):
        load_serve_file(REPO / "configs" / "serve" / "demo.yaml", ["batching.max_batch_sise=3"])
    with pytest.raises(ConfigError, match="auth.token"):
        load_serve_file(REPO / "configs" / "serve" / "demo.yaml", ["auth.token=short"])


def test_generative_model_scores_by_the_plain_contract_and_extends_its_cache(tiny_registered_model, tmp_path):
    """A gr model (interleaved context, items and actions; two task heads), served by the same Scorer the
    Ranking and Retrieval deployments use: M-FALCON's per-task scores equal GenerativeRecommender.rank
    (each candidate alone after the history; tolerance 1e-5), the user vector equals the model's own
    output at the last action token, and appending events extends the cached history."""
    from genrec.artifact import build_model, save_model_folder
    from genrec.data.batches import build_batch, context_offsets
    from genrec.data.prepared import read_manifest
    from genrec.serve.model import ModelCall, Scorer

    base = tiny_registered_model["cfg"]
    cfg = base.model_copy(update={
        "model": base.model.model_copy(update={"kind": "gr"}),
        "batching": base.batching.model_copy(update={"layout": "interleaved"}),
        "ranking": base.ranking.model_validate({"tasks": [{"name": "like", "action": "like"},
                                                          {"name": "buy", "action": "purchase"}]})})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    folder = save_model_folder(tmp_path / "gr", cfg, model.state_dict())
    scorer = Scorer(folder, cache_bytes=1 << 20, microbatch=3)
    assert scorer.tasks == ["like", "buy"]

    manifest = read_manifest(cfg.data.output_dir)
    columns = list(manifest["context_features"])
    table = read_split(cfg.data.output_dir, "sequences")
    row = next(i for i, items in enumerate(table["items"].to_pylist()) if 6 <= len(items) <= 12)
    user = table.slice(row, 1)
    items, actions, stamps = (np.asarray(user[c][0].as_py()) for c in ("items", "actions", "timestamps"))
    # the training batch builder's tokens: context, (item, action) for all but the last event, the last item
    batch = build_batch(user, "interleaved", 16, tuple(columns), context_offsets(manifest, columns))
    tokens = {"item_ids": torch.as_tensor(batch["item_ids"][:-1]), "timestamps": torch.as_tensor(batch["timestamps"][:-1]),
              "token_types": torch.as_tensor(batch["token_types"][:-1])}
    candidates = torch.arange(1, 41)
    t = int(stamps[-1])
    expected = model.rank(tokens, candidates, t)
    request = ModelCall(items=items[:-1], actions=actions[:-1], timestamps=stamps[:-1], request_time=t,
                        context=tuple(user[c][0].as_py() for c in columns), user="u", version=len(items) - 1,
                        seen=np.unique(items[:-1]), candidates=candidates.numpy())
    got = scorer.rank([request])[0]
    assert got["cache"] == "miss"
    assert torch.tensor(got["scores"]) == pytest.approx(expected, abs=1e-5)
    # the user vector: the model's own output at the last action token, which predicts the held-out item
    with torch.no_grad():
        vectors, _ = model(*(torch.as_tensor(batch[k]) for k in ("item_ids", "token_types", "timestamps",
                                                                  "target_timestamps", "offsets")))
    served, states, _ = scorer.user_vectors([request])
    assert states == ["hit"] and served[0] == pytest.approx(vectors[-2], abs=1e-5)
    # the held-out event appended: the cache is extended, and scores as a fresh encoding does
    later = dataclasses.replace(request, items=items, actions=actions, timestamps=stamps, version=len(items),
                                request_time=t + 60)
    extended = scorer.rank([later])[0]
    fresh = scorer.rank([dataclasses.replace(later, user=None)])[0]
    assert extended["cache"] == "extended" and fresh["cache"] == "none"
    assert torch.tensor(extended["scores"]) == pytest.approx(torch.tensor(fresh["scores"]), abs=1e-5)
