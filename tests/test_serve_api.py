"""The HTTP API's contract over real HTTP on the Serve app (the tiny registered model of conftest): bad
input is a 4xx, never a 500 (NaN and Infinity as numbers, lone surrogates, booleans as ids); every error
answer has the one documented body; the OpenAPI schema says what the server does (which statuses each
route answers, exactly one of user_id or history, the token on writes), checked by schemathesis with all
its checks; the token is checked before a write's body is read; cold-start items carry their popularity,
not a score."""

import collections
import socket
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig

from conftest import fixed_replicas
from genrec.serve.deploy import load_serve_file, start

REPO = Path(__file__).resolve().parents[1]
TOKEN = "serve-api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
# 422s for requests the schema cannot rule out, as they depend on the model served (the schema's 422 says so)
CATALOG_ERRORS = {"unknown_action", "unknown_task", "unknown_item", "request_time_before_history"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=60)
        self.users = self.http.get("/v1/users", params={"limit": 20}).json()

    def raw(self, path: str, text: str, headers: dict | None = None) -> httpx.Response:
        """POST a body exactly as written (JSON that httpx would not write: NaN, lone surrogate escapes)."""
        return self.http.post(path, content=text.encode(), headers={**JSON, **(headers or {})})

    def history(self, user) -> list[dict]:
        return self.http.get(f"/v1/users/{user}/history", params={"limit": 10_000}).json()["events"]


@pytest.fixture(scope="module")
def app(tiny_registered_model, tmp_path_factory):
    from ray import serve

    m = tiny_registered_model
    tree = load_serve_file(REPO / "configs" / "serve" / "demo.yaml", [
        f"model.uri={m['uri']}", f"model.tracking_uri={m['tracking_uri']}", f"auth.token={TOKEN}",
        f"store.events_db={tmp_path_factory.mktemp('serve-api') / 'events.sqlite'}", "retrieval.candidates=30",
        *fixed_replicas()])
    yield Served(start(tree, port=free_port()))
    serve.shutdown()


def assert_error_body(response: httpx.Response, status: int, loc: list | None = None, kind: str | None = None):
    """The one error body: {"detail": [{"loc": [...], "msg": "...", "type": "..."}]}, with no input echoed."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all(set(d) == {"loc", "msg", "type"} and d["msg"] and isinstance(d["loc"], list) for d in detail), detail
    if loc is not None:
        assert loc in [d["loc"] for d in detail], detail
    if kind is not None:
        assert kind in [d["type"] for d in detail], detail
    return detail


@pytest.mark.parametrize("path", ["/v1/retrieve", "/v1/recommend"])
@pytest.mark.parametrize("k", ["NaN", "Infinity", "-Infinity"])
def test_k_as_nan_or_infinity_is_a_422_naming_k(app, path, k):
    assert_error_body(app.raw(path, f'{{"user_id": {app.users[0]}, "k": {k}}}'), 422, ["body", "k"], "finite_number")


@pytest.mark.parametrize("path, body", [
    ("/v1/retrieve", '{"user_id": "\\ud800"}'),
    ("/v1/recommend", '{"user_id": "\\ud800", "k": 3}'),
    ("/v1/rank", '{"user_id": "\\udfff", "candidates": [1]}'),
    ("/v1/rank", '{"user_id": 1, "candidates": ["\\ud800"]}'),
    ("/v1/rank", '{"user_id": 1, "candidates": [1], "tasks": ["\\ud800"]}'),
    ("/v1/retrieve", '{"history": [{"item_id": "\\ud800"}]}'),
    ("/v1/retrieve", '{"history": [{"item_id": 1, "action": "\\ud800"}]}'),
    ("/v1/retrieve", '{"user_id": 1, "\\ud800": 1}'),  # an unknown key: named in loc, escaped
])
def test_a_lone_surrogate_anywhere_is_a_422(app, path, body):
    detail = assert_error_body(app.raw(path, body), 422)
    assert any(d["type"] == "string_unicode" for d in detail), detail


def test_a_lone_surrogate_in_a_write_or_a_path_is_no_500(app):
    # a write is parsed by pydantic's JSON reader after the token check: its lone surrogate is invalid JSON
    assert_error_body(app.raw("/v1/events", '{"user_id": "\\ud800", "events": [{"item_id": 1}]}', AUTH), 422,
                      ["body"], "json_invalid")
    assert_error_body(app.raw("/v1/events", '{"user_id": 1, "events": [{"item_id": 1, "event_id": "\\ud800"}]}',
                              AUTH), 422)
    # a URL cannot carry one: its UTF-8 bytes decode to replacement characters, a user never seen; an id
    # with a "/" or a newline in it is an id too (not a 404)
    for path, user in [("/v1/users/%ED%A0%80/history", "\ufffd\ufffd\ufffd"), ("/v1/users/a%2Fb/history", "a/b"),
                       ("/v1/users/a%0Ab/history", "a\nb")]:
        response = app.http.get(path)
        assert response.status_code == 200 and response.json() == {"user_id": user, "known": False, "events": []}


def test_booleans_and_other_non_integers_are_not_accepted_as_numbers(app):
    """Integers as JSON Schema has them: 3 and 3.0, never true, "3" or 2.5."""
    user = app.users[0]
    assert len(app.http.post("/v1/retrieve", json={"user_id": float(user), "k": 3.0}).json()["items"]) == 3
    for body, loc in [({"user_id": True}, ["body", "user_id"]),
                      ({"user_id": user, "candidates": [False, True]}, ["body", "candidates", 0]),
                      ({"user_id": user, "k": True}, ["body", "k"]),
                      ({"user_id": user, "k": "3"}, ["body", "k"]),
                      ({"user_id": user, "k": 2.5}, ["body", "k"]),
                      ({"user_id": user, "request_time": True}, ["body", "request_time"]),
                      ({"history": [{"item_id": 1, "timestamp": False}]}, ["body", "history", 0, "timestamp"])]:
        path = "/v1/rank" if "candidates" in body else "/v1/retrieve"
        assert_error_body(app.http.post(path, json=body), 422, loc)
    write = app.http.post("/v1/events", json={"user_id": False, "events": [{"item_id": 1}]}, headers=AUTH)
    assert_error_body(write, 422, ["body", "user_id"], "raw_id")
    # integer ids up to 2^53 - 1 (what the schema's bounds and any JSON reader keep exactly); larger as strings
    too_big = assert_error_body(app.http.post("/v1/retrieve", json={"user_id": 2**53}), 422, ["body", "user_id"])
    assert "as a string" in too_big[0]["msg"]
    for user in (2**53 - 1, -(2**53 - 1), str(2**64)):
        assert app.http.post("/v1/retrieve", json={"user_id": user}).json()["user_id"] == user


def test_an_empty_user_id_says_what_an_id_is(app):
    detail = assert_error_body(app.http.post("/v1/retrieve", json={"user_id": ""}), 422, ["body", "user_id"], "raw_id")
    assert len(detail) == 1 and "integer or a string of 1 to 128 characters" in detail[0]["msg"]
    assert "empty" in detail[0]["msg"]


def test_exactly_one_of_user_id_or_history_is_in_the_schema_and_enforced(app):
    schemas = app.http.get("/openapi.json").json()["components"]["schemas"]
    for name in ("RetrieveRequest", "RankRequest", "RecommendRequest"):
        assert schemas[name]["oneOf"] == [{"required": ["user_id"]}, {"required": ["history"]}]
        assert "null" not in str(schemas[name]["properties"]["user_id"])
    for body in ({}, {"k": 3}, {"user_id": app.users[0], "history": []}, {"user_id": None, "history": []}):
        assert_error_body(app.http.post("/v1/retrieve", json=body), 422)


def test_every_error_answer_has_the_documented_body_and_status(app):
    user = app.users[0]
    paths = app.http.get("/openapi.json").json()["paths"]
    cases = [
        ("/v1/rank", app.http.post("/v1/rank", json={"user_id": user, "candidates": [1], "tasks": ["ctr"]}),
         422, ["body", "tasks"], "unknown_task"),
        ("/v1/retrieve", app.http.post("/v1/retrieve", json={"history": [{"item_id": 1, "action": "stare"}]}),
         422, ["body", "history", 0, "action"], "unknown_action"),
        ("/v1/events", app.http.post("/v1/events", json={"user_id": user, "events": [{"item_id": 1, "action": "stare"}]},
                                     headers=AUTH), 422, ["body", "events", 0, "action"], "unknown_action"),
        ("/v1/events", app.http.post("/v1/events", json={"user_id": user, "events": [{"item_id": 1}]}),
         401, ["header", "authorization"], "unauthorized"),
        ("/v1/rank", app.raw("/v1/rank", '{"pad": "' + "x" * 300_000 + '"}'), 413, ["body"], "too_large"),
        ("/v1/retrieve", app.http.post("/v1/retrieve", content=b'{"user_id": "\xff"}', headers=JSON),
         400, [], "bad_request"),
        ("/v1/users", app.http.get("/v1/users", params={"limit": 0}), 422, ["query", "limit"], None),
    ]
    for path, response, status, loc, kind in cases:
        assert_error_body(response, status, loc, kind)
        documented = paths[path]["post" if path != "/v1/users" else "get"]["responses"][str(status)]
        assert documented["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "ErrorBody" in app.http.get("/openapi.json").json()["components"]["schemas"]
    assert_error_body(app.http.get("/v1/nothing-here"), 404, [], "not_found")
    assert app.http.get("/v1/retrieve").status_code == 405


def test_a_write_checks_the_token_before_it_reads_the_body(app):
    bad_bodies = ['{"user_id": 1, "events": []}', '{"surprise": true}', '{not json', '[1, 2]']
    for body in bad_bodies:
        assert_error_body(app.raw("/v1/events", body), 401, ["header", "authorization"], "unauthorized")
        wrong = app.raw("/v1/events", body, {"Authorization": "Bearer not-the-token-0123456789"})
        assert_error_body(wrong, 401)
        assert_error_body(app.raw("/v1/events", body, AUTH), 422)
    schema = app.http.get("/openapi.json").json()
    assert schema["paths"]["/v1/events"]["post"]["security"] == [{"HTTPBearer": []}]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    body = schema["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["user_id", "events"] and body["properties"]["events"]["items"] == {
        "$ref": "#/components/schemas/Event"}


def test_ranking_only_unknown_candidates_is_a_422_naming_candidates(app):
    for who in ({"user_id": app.users[0]}, {"user_id": "nobody-ever"}):
        response = app.http.post("/v1/rank", json={**who, "candidates": [10**9, "no-such-item"]})
        detail = assert_error_body(response, 422, ["body", "candidates"], "unknown_item")
        assert "no-such-item" in detail[0]["msg"]
    known = app.history(app.users[0])[0]["item_id"]
    mixed = app.http.post("/v1/rank", json={"user_id": app.users[0], "candidates": [known, 10**9]}).json()
    assert [i["item_id"] for i in mixed["items"]] == [known] and mixed["unknown_items"] == [10**9]


def test_a_request_time_before_the_history_is_a_422_naming_request_time(app):
    user = app.users[1]
    last = max(e["timestamp"] for e in app.history(user))
    early = app.http.post("/v1/retrieve", json={"user_id": user, "request_time": last - 1})
    detail = assert_error_body(early, 422, ["body", "request_time"], "request_time_before_history")
    assert str(last) in detail[0]["msg"]
    assert app.http.post("/v1/retrieve", json={"user_id": user, "request_time": last}).status_code == 200
    item = app.history(user)[0]["item_id"]
    given = app.http.post("/v1/recommend", json={"history": [{"item_id": item, "timestamp": 2000}],
                                                 "request_time": 1000})
    assert_error_body(given, 422, ["body", "request_time"], "request_time_before_history")
    # a stored user unknown, or no request_time: nothing to compare
    assert app.http.post("/v1/retrieve", json={"user_id": "nobody-ever", "request_time": 0}).status_code == 200


def test_cold_start_items_carry_popularity_not_a_score(app):
    cold = app.http.post("/v1/recommend", json={"user_id": "nobody-ever", "k": 5}).json()
    assert cold["cold_start"]
    assert all(i["score"] is None and i["popularity"] > 0 for i in cold["items"]), cold
    assert [i["popularity"] for i in cold["items"]] == sorted((i["popularity"] for i in cold["items"]), reverse=True)
    known = app.history(app.users[0])[0]["item_id"]
    ranked = app.http.post("/v1/rank", json={"user_id": "nobody-ever", "candidates": [known]}).json()
    assert ranked["cold_start"] and ranked["items"][0]["score"] is None and ranked["items"][0]["popularity"] > 0
    warm = app.http.post("/v1/recommend", json={"user_id": app.users[0], "k": 5}).json()
    assert all(isinstance(i["score"], float) and i["popularity"] is None for i in warm["items"]), warm
    item = app.http.get("/openapi.json").json()["components"]["schemas"]["Item"]["properties"]
    assert "cold-start" in item["score"]["description"] and "cold start" in item["popularity"]["description"]


def valid_requests_are_accepted_unless_the_model_says_no(ctx, response, case):
    """schemathesis's positive_data_acceptance, but for the 422s the schema documents as depending on the
    model served (an unknown action, task or item, a request_time before the history), which no schema can
    rule out: a request the schema allows is accepted, or rejected for one of those reasons only."""
    if response.status_code == 422 and {d["type"] for d in response.json()["detail"]} <= CATALOG_ERRORS:
        return None
    return positive_data_acceptance(ctx, response, case)


def test_fuzzed_requests_pass_every_schemathesis_check(app):
    """Schemathesis: valid (positive) and invalid (negative) requests for every operation of the OpenAPI
    schema, with the write token, each answer checked by all of schemathesis's checks (no 5xx, status and
    body as documented, invalid data rejected, valid data accepted, auth not ignored, ...). Runs last: its
    writes go to whatever users it draws."""
    # 413 is a rejection too: a body over the size limit (say, a history over its maxItems) gets it first
    rejections = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": rejections}}})
    schema = schemathesis.openapi.from_url(f"{app.url}/openapi.json", config=config)
    statuses, waived = collections.Counter(), collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def fuzz(case):
                response = case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance],
                                                  additional_checks=[valid_requests_are_accepted_unless_the_model_says_no])
                statuses[response.status_code] += 1
                if mode is GenerationMode.POSITIVE and response.status_code == 422:
                    waived[operation.label] += 1

            try:
                fuzz()
            except Unsatisfiable:  # e.g. no invalid request exists for GET /healthz
                assert mode is GenerationMode.NEGATIVE
    print(f"statuses {dict(statuses)}; valid requests the model refused: {dict(waived)}")
    assert sum(n for s, n in statuses.items() if s < 300) > 50 and statuses[422] > 50
    assert all(s < 500 for s in statuses), statuses
