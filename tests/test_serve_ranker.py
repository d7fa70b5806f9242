"""The whole Generative Recommender served: a retrieval HSTU and a GR ranker, trained on the same tiny
multi-action world and registered in MLflow, served as one Serve app over real HTTP. /v1/rank and the
ranking stage of /v1/recommend run the trained ranker through M-FALCON; their per-task scores equal the
ranker's own `rank()`; task weights combine them as documented; events extend the ranker's cache."""

import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import fixed_replicas, tiny_ranking_config
from genrec.artifact import load_model
from genrec.config import ConfigError, ServeConfig
from genrec.data.batches import context_offsets
from genrec.data.layout import interleave
from genrec.data.pipeline import prepare
from genrec.data.prepared import read_manifest, read_split, read_vocab
from genrec.serve.deploy import load_serve_file, start
from genrec.serve.model import ModelLoadError, serving_device

REPO = Path(__file__).resolve().parents[1]
TOKEN = "ranker-test-token-0123456789"
NOW = 1_900_000_000  # after every synthetic event: a fixed request time
WEIGHTS = {"click": 2.0}  # like weighs 1 (tasks not named weigh 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(ray_cluster, tmp_path_factory):
    """A retrieval HSTU and a GR ranker (tasks click and like) on one prepared world, both registered."""
    from genrec.train.trainer import fit

    root = tmp_path_factory.mktemp("ranker")
    ranker = tiny_ranking_config(root, "tiny-ranker", {"kind": "gr"}, ["click", "like"], num_items=150,
                                 epochs=2, seed=3)
    retrieval = ranker.model_copy(update={
        "name": "tiny-retrieval", "model": ranker.model.model_copy(update={"kind": "hstu"}),
        "batching": ranker.batching.model_copy(update={"layout": "items"})})
    prepare(ranker.data, log=lambda *_: None)
    uris = {}
    for cfg in (retrieval, ranker):
        result = fit(cfg, log=lambda *_: None)
        uris[cfg.name] = f"models:/{result['registered_model']}/{result['version']}"
    return {"cfg": ranker, "retrieval": uris["tiny-retrieval"], "ranker": uris["tiny-ranker"],
            "tracking_uri": ranker.tracking.tracking_uri, "root": root}


@pytest.fixture(scope="module")
def app(models):
    from ray import serve

    m = models
    tree = load_serve_file(REPO / "configs" / "serve" / "demo.yaml", [
        f"model.uri={m['retrieval']}", f"model.tracking_uri={m['tracking_uri']}",
        f"ranker.uri={m['ranker']}", f"ranker.tracking_uri={m['tracking_uri']}",
        f"store.events_db={m['root'] / 'events.sqlite'}", f"auth.token={TOKEN}", "retrieval.candidates=40",
        "ranking.task_weights={click: 2.0}", "ranking.microbatch=7",
        # one replica of each: the M-FALCON cache states asserted below are that Ranking replica's
        *fixed_replicas()])
    url = start(tree, port=free_port())
    yield {"url": url, "tree": tree, "http": httpx.Client(base_url=url, timeout=60)}
    serve.shutdown()


@pytest.fixture(scope="module")
def world(models):
    """The prepared world as the tests read it: raw <-> dense ids, stored histories, context features."""
    data = models["cfg"].data.output_dir
    users = read_vocab(data, "users")
    items = read_vocab(data, "items")
    manifest = read_manifest(data)
    columns = list(manifest.get("context_features") or {})
    seq = read_split(data, "sequences")
    raw_user = dict(zip(users["index"].to_pylist(), users["user_id"].to_pylist()))
    histories = {}
    for row in seq.to_pylist():
        histories[raw_user[row["user"]]] = {
            "items": np.asarray(row["items"]), "actions": np.asarray(row["actions"]),
            "timestamps": np.asarray(row["timestamps"]), "context": np.asarray([row[c] for c in columns], np.int64)}
    return {"item_raw": dict(zip(items["index"].to_pylist(), items["item_id"].to_pylist())),
            "histories": histories, "shifts": np.asarray(context_offsets(manifest, columns), np.int64)}


def ranker_scores(models, world, history: dict, candidates: list[int]) -> torch.Tensor:
    """The registered ranker's own rank(): each candidate after the interleaved history, [m, tasks]."""
    model, cfg = load_model(models["ranker"], models["tracking_uri"])
    n = min(len(history["items"]), cfg.kept_items)
    tokens = interleave((history["context"] + world["shifts"])[None], history["items"][-n:],
                        history["actions"][-n:], history["timestamps"][-n:], np.array([n]))
    inputs = {"item_ids": torch.from_numpy(tokens.ids), "token_types": torch.from_numpy(tokens.token_types),
              "timestamps": torch.from_numpy(tokens.timestamps)}
    with torch.no_grad():
        return model.eval().rank(inputs, torch.as_tensor(candidates), NOW)


def a_user(world, longest: int):
    """A user with a history of at most `longest` events (the ranker's cache can extend it)."""
    return next(u for u, h in world["histories"].items() if 4 <= len(h["items"]) <= longest)


def test_rank_over_http_equals_the_trained_rankers_own_scores(models, app, world):
    user = a_user(world, 8)
    dense = list(range(1, 26))
    body = {"user_id": user, "candidates": [world["item_raw"][d] for d in dense], "request_time": NOW}
    answer = app["http"].post("/v1/rank", json=body).json()
    assert answer["ranker"]["name"] == "tiny-ranker" and answer["model"]["name"] == "tiny-retrieval"
    expected = ranker_scores(models, world, world["histories"][user], dense)
    by_raw = {i["item_id"]: i for i in answer["items"]}
    for row, d in zip(expected.tolist(), dense):
        item = by_raw[world["item_raw"][d]]
        assert [item["scores"]["click"], item["scores"]["like"]] == pytest.approx(row, abs=1e-5)
        assert item["score"] == pytest.approx(2.0 * row[0] + row[1], abs=1e-5)
    scores = [i["score"] for i in answer["items"]]
    assert scores == sorted(scores, reverse=True)


def test_task_weights_and_chosen_tasks_order_the_candidates(app, world):
    user = a_user(world, 20)
    body = {"user_id": user, "candidates": [world["item_raw"][d] for d in range(1, 31)], "request_time": NOW}
    for tasks, weight in ((["like"], 1.0), (["click"], WEIGHTS["click"])):
        items = app["http"].post("/v1/rank", json=body | {"tasks": tasks}).json()["items"]
        task = tasks[0]
        assert list(items[0]["scores"]) == [task]  # only the chosen task is scored in the answer
        assert [i["score"] for i in items] == pytest.approx([weight * i["scores"][task] for i in items])
        assert [i["scores"][task] for i in items] == sorted((i["scores"][task] for i in items), reverse=True)
    wrong = app["http"].post("/v1/rank", json=body | {"tasks": ["purchase"]})
    assert wrong.status_code == 422 and "purchase" in wrong.text


def test_an_event_extends_the_rankers_cache_and_changes_its_scores(models, app, world):
    user = a_user(world, 6)
    history = {k: v.copy() for k, v in world["histories"][user].items()}
    dense = list(range(1, 21))
    body = {"user_id": user, "candidates": [world["item_raw"][d] for d in dense], "request_time": NOW}
    http = app["http"]
    first = http.post("/v1/rank", json=body).json()
    assert first["cache"] in ("miss", "hit")
    item, stamp = int(history["items"][0]), int(history["timestamps"][-1]) + 60
    posted = http.post("/v1/events", json={"user_id": user, "events": [
        {"item_id": world["item_raw"][item], "action": "like", "timestamp": stamp}]},
        headers={"Authorization": f"Bearer {TOKEN}"})
    assert posted.status_code == 200, posted.text
    after = http.post("/v1/rank", json=body).json()
    assert after["cache"] == "extended" and after["history_used"] == len(history["items"]) + 1
    like = read_manifest(models["cfg"].data.output_dir)["actions"].index("like")
    action = 1 << like if read_manifest(models["cfg"].data.output_dir).get("action_encoding") == "bitmask" else like
    for key, value in (("items", item), ("actions", action), ("timestamps", stamp)):
        history[key] = np.append(history[key], value)
    expected = ranker_scores(models, world, history, dense)
    by_raw = {i["item_id"]: i["scores"] for i in after["items"]}
    for row, d in zip(expected.tolist(), dense):
        assert [by_raw[world["item_raw"][d]][t] for t in ("click", "like")] == pytest.approx(row, abs=1e-5)


def test_recommend_retrieves_with_one_model_and_ranks_with_the_other(app, world):
    http = app["http"]
    user = a_user(world, 20)
    retrieved = http.post("/v1/retrieve", json={"user_id": user, "k": 40, "request_time": NOW}).json()
    answer = http.post("/v1/recommend", json={"user_id": user, "k": 10, "request_time": NOW}).json()
    assert answer["model"]["name"] == "tiny-retrieval" and answer["ranker"]["name"] == "tiny-ranker"
    assert {i["item_id"] for i in answer["items"]} <= {i["item_id"] for i in retrieved["items"]}
    assert all(set(i["scores"]) == {"click", "like"} for i in answer["items"])
    # the ranker's order, not retrieval's: equal to /v1/rank of the same 40 retrieved items, top 10
    ranked = http.post("/v1/rank", json={"user_id": user, "candidates": [i["item_id"] for i in retrieved["items"]],
                                         "request_time": NOW}).json()
    assert [i["item_id"] for i in answer["items"]] == [i["item_id"] for i in ranked["items"][:10]]
    info = http.get("/v1/model").json()
    assert info["name"] == "tiny-retrieval" and info["kind"] == "hstu" and info["tasks"] == ["click", "like"]
    assert info["ranker"]["name"] == "tiny-ranker" and info["ranker"]["kind"] == "gr"


def test_a_ranker_of_other_data_is_refused_and_the_live_pair_stays(app, tiny_registered_model):
    """tiny_registered_model was trained on another world (120 items, not 150): its ids mean other items."""
    tree = app["tree"]
    user_config = tree["applications"][0]["deployments"]
    ingress = next(d for d in user_config if d["name"] == "Ingress")
    ingress["user_config"]["ranker"] = {"uri": tiny_registered_model["uri"],
                                        "tracking_uri": tiny_registered_model["tracking_uri"]}
    start(tree, port=int(app["url"].rsplit(":", 1)[1]))
    info = app["http"].get("/v1/model").json()
    assert info["rollout"]["state"] == "failed" and "vocabulary differs" in info["rollout"]["error"]
    assert info["ranker"]["name"] == "tiny-ranker"  # the pair that was live still answers


def test_the_serving_device_is_chosen_by_config():
    assert serving_device("cpu") == "cpu"
    assert serving_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="device: cuda"):
            serving_device("cuda")
    with pytest.raises(Exception, match="device"):
        ServeConfig.model_validate({"device": "tpu"})
    with pytest.raises(ConfigError, match="device"):
        load_serve_file(REPO / "configs" / "serve" / "demo.yaml", ["device=tpu"])
