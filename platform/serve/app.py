"""The Ray Serve application: a FastAPI ingress in front of two model deployments.

    Ingress    HTTP (FastAPI, OpenAPI at /docs): validation and limits, the history
               store, ids <-> dense indices, item metadata, cold start, auth on writes
    Retrieval  history -> top-k items by inner product over the whole item table (exact)
    Ranking    history + candidates -> per-task scores (M-FALCON for HSTU)

Retrieval and Ranking batch requests of different users together (@serve.batch,
sizes from the config) and run torch off the event loop. The ingress retries a
call whose model replica died (up to MODEL_CALL_ATTEMPTS attempts, counted in the
`x-genrec-retries` response header), so losing a replica loses no request.

Start it from a Serve config file (configs/serve/*.yaml) with jobs/serve.py, or
`serve run` / `serve deploy` the same file (import_path genrec.serve.app:build_app).
"""


import asyncio
import hmac
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from ..config import ConfigError, ServeConfig, _describe, parse_override, resolve_path
from . import schemas as s
from .model import Catalog, ModelSource, Scorer, fetch, resolve_model
from .page import PAGE
from .store import EmbeddedHistoryStore, History, user_key

log = logging.getLogger("genrec.serve")
MODEL_CALL_ATTEMPTS = 3
DEPLOYMENTS = ("Ingress", "Retrieval", "Ranking")


class _ModelReplica:
    """One replica's copy of the pinned model (see Scorer)."""

    def __init__(self, settings: dict, source: dict) -> None:
        cfg = ServeConfig.model_validate(settings)
        torch.set_num_threads(cfg.torch_threads)
        self.source = ModelSource(**source)
        self.scorer = Scorer(fetch(self.source), cfg.ranking.cache_bytes, cfg.ranking.microbatch)
        self.batched.set_max_batch_size(cfg.batching.max_batch_size)
        self.batched.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)

    def info(self, _request: dict | None = None) -> dict:
        return {"tasks": self.scorer.tasks, "kind": self.scorer.kind, "pid": os.getpid()}

    async def __call__(self, request: dict) -> dict:
        return await self.batched(request)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Retrieval(_ModelReplica):
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def batched(self, requests: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self.scorer.retrieve, requests)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Ranking(_ModelReplica):
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def batched(self, requests: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self.scorer.rank, requests)


class BodyLimit:
    """413 for a request body over MAX_BODY_BYTES, whether it announces its length or streams."""

    def __init__(self, app, limit: int = s.MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"detail": f"request body over {self.limit} bytes (the documented limit)"}, 413)
        await response(scope, receive, send)


api = FastAPI(title="genrec", version="1", description=s.__doc__)
api.add_middleware(BodyLimit)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, retrieval, ranking, settings: dict, source: dict, root: str) -> None:
        """root: the folder relative paths (store, the model's data folder) are taken from, the driver's."""
        self.cfg = ServeConfig.model_validate(settings)
        self.source = ModelSource(**source)
        self.retrieval, self.ranking = retrieval, ranking
        self.catalog = Catalog(fetch(self.source))
        prepared = self.cfg.store.sequences or self.catalog.experiment.data.output_dir
        os.environ["GENREC_ROOT"] = root  # for resolve_path in this replica's process
        self.store = EmbeddedHistoryStore(resolve_path(prepared), resolve_path(self.cfg.store.events_db))
        counts = self.store.item_counts()
        counts = np.pad(counts, (0, max(0, self.catalog.num_items + 1 - len(counts))))
        counts[0] = 0  # padding
        self.counts = counts
        self.popular = np.argsort(-counts, kind="stable")[: int((counts > 0).sum())]
        self.token = self.cfg.auth.token or os.environ.get(self.cfg.auth.token_env) or None
        self.tasks: list[str] | None = None
        self.kind = self.catalog.experiment.model.kind

    # ------------------------------------------------------------------ helpers

    async def _call(self, handle, payload: dict, response: Response) -> dict:
        """A model call, retried on another replica when the one it reached died."""
        for attempt in range(MODEL_CALL_ATTEMPTS):
            try:
                result = await handle.remote(payload)
                break
            except (RayActorError, ActorUnavailableError) as err:
                if attempt == MODEL_CALL_ATTEMPTS - 1:
                    raise HTTPException(503, f"model replica unavailable after {MODEL_CALL_ATTEMPTS} attempts") from err
                log.warning("model replica failed (%s); retrying", type(err).__name__)
        retries = int(response.headers.get("x-genrec-retries", 0)) + attempt
        response.headers["x-genrec-retries"] = str(retries)
        return result

    async def _tasks(self, response: Response) -> list[str]:
        if self.tasks is None:
            self.tasks = (await self._call(self.ranking.info, {}, response))["tasks"]
        return self.tasks

    def _model(self) -> s.ModelRef:
        return s.ModelRef(name=self.source.name, version=self.source.version)

    def _dense(self, ids) -> tuple[list[int], list]:
        known, unknown = [], []
        for raw in ids:
            dense = self.catalog.dense.get(str(raw))
            if dense is None:
                unknown.append(raw)
            else:
                known.append(dense)
        return known, unknown

    def _events(self, events: list[s.Event], now: int, field: str, strict: bool) -> tuple[History, list]:
        """Request events -> dense History; unknown items are dropped (strict: 422), unknown actions 422."""
        items, actions, stamps, unknown = [], [], [], []
        for i, e in enumerate(events):
            action = self.catalog.action_id(e.action)
            if action is None:
                raise HTTPException(422, f"{field}[{i}].action: unknown action {e.action!r}; "
                                         f"known: {self.catalog.actions}")
            dense = self.catalog.dense.get(str(e.item_id))
            if dense is None:
                unknown.append(e.item_id)
                continue
            items.append(dense)
            actions.append(action)
            stamps.append(now if e.timestamp is None else e.timestamp)
        if strict and unknown:
            raise HTTPException(422, f"{field}: unknown item ids {unknown[:20]} (not in the model's catalog)")
        return History(*(np.asarray(a, dtype=np.int64) for a in (items, actions, stamps))), unknown

    def _query(self, q: s.UserQuery) -> dict:
        """The history a request is about, cut to the model's N, as the model deployments take it."""
        now = int(time.time()) if q.request_time is None else q.request_time
        unknown: list = []
        if q.history is not None:
            history, unknown = self._events(q.history, now, "history", strict=False)
            user = None
        else:
            user = user_key(q.user_id)
            history = self.store.history(user)
        version = history.version if history is not None else 0
        n = min(version, self.catalog.max_seq_len)
        return {"user": user, "version": version, "request_time": now, "unknown": unknown,
                "items": history.items[version - n:] if n else None,
                "seen": np.unique(history.items) if n else None,  # excluded from retrieval: all, not only the last N
                "timestamps": history.timestamps[version - n:] if n else None,
                "actions": history.actions[version - n:] if n else None, "context": history.context if n else ()}

    def _item(self, dense: int, score: float, scores: dict | None = None) -> s.Item:
        return s.Item(score=score, scores=scores, **self.catalog.item(dense))

    def _cold(self, query: dict, user_id, k: int) -> s.Answer:
        items = [self._item(int(d), float(self.counts[d])) for d in self.popular[:k]]
        return s.Answer(model=self._model(), user_id=user_id, items=items, cold_start=True, history_used=0,
                        unknown_items=query["unknown"])

    def _weights(self, requested: list[str] | None, tasks: list[str]) -> dict[str, float]:
        chosen = requested or tasks
        unknown = [t for t in chosen if t not in tasks]
        if unknown:
            raise HTTPException(422, f"tasks: unknown {unknown}; this model scores {tasks}")
        return {t: self.cfg.ranking.task_weights.get(t, 1.0) for t in chosen}

    async def _rank(self, query: dict, dense: list[int], requested, response: Response) -> list[tuple]:
        """-> [(dense, combined, {task: score})] best first."""
        tasks = await self._tasks(response)
        weights = self._weights(requested, tasks)
        out = await self._call(self.ranking, {**query, "candidates": np.asarray(dense, dtype=np.int64)}, response)
        ranked = []
        for d, row in zip(dense, out["scores"]):
            scores = {t: float(v) for t, v in zip(tasks, row) if t in weights}
            ranked.append((d, sum(weights[t] * v for t, v in scores.items()), scores))
        ranked.sort(key=lambda r: -r[1])
        return ranked, out["cache"]

    # ------------------------------------------------------------------ reads

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self._model().model_dump()}

    @api.get("/v1/model", response_model=s.ModelInfo)
    async def model(self, response: Response) -> s.ModelInfo:
        tasks = await self._tasks(response)
        return s.ModelInfo(name=self.source.name, version=self.source.version, uri=self.source.uri,
                           run_id=self.source.run_id, kind=self.kind, tasks=tasks,
                           task_weights={t: self.cfg.ranking.task_weights.get(t, 1.0) for t in tasks},
                           actions=self.catalog.actions, num_items=self.catalog.num_items,
                           max_seq_len=self.catalog.max_seq_len, metrics=self.source.metrics,
                           limits={"max_body_bytes": s.MAX_BODY_BYTES, "max_k": s.MAX_K,
                                   "max_candidates": s.MAX_CANDIDATES, "max_history": s.MAX_HISTORY,
                                   "max_events": s.MAX_EVENTS, "max_seq_len": self.catalog.max_seq_len})

    @api.post("/v1/retrieve", response_model=s.Answer)
    async def retrieve(self, body: s.RetrieveRequest, response: Response) -> s.Answer:
        query = self._query(body)
        if query["items"] is None:
            return self._cold(query, body.user_id, body.k)
        out = await self._call(self.retrieval, {**query, "k": body.k,
                                                "exclude_history": self.cfg.retrieval.exclude_history}, response)
        items = [self._item(d, v) for d, v in zip(out["items"], out["scores"])]
        return s.Answer(model=self._model(), user_id=body.user_id, items=items, history_used=len(query["items"]),
                        unknown_items=query["unknown"], cache=out["cache"])

    @api.post("/v1/rank", response_model=s.Answer)
    async def rank(self, body: s.RankRequest, response: Response) -> s.Answer:
        query = self._query(body)
        dense, unknown = self._dense(body.candidates)
        query["unknown"] += unknown
        if query["items"] is None or not dense:
            self._weights(body.tasks, await self._tasks(response))  # a bad task name is a 422 here too
            ranked = sorted(dense, key=lambda d: -self.counts[d])
            return s.Answer(model=self._model(), user_id=body.user_id, cold_start=query["items"] is None,
                            items=[self._item(d, float(self.counts[d])) for d in ranked], history_used=0,
                            unknown_items=query["unknown"])
        ranked, cache = await self._rank(query, dense, body.tasks, response)
        return s.Answer(model=self._model(), user_id=body.user_id, items=[self._item(*r) for r in ranked],
                        history_used=len(query["items"]), unknown_items=query["unknown"], cache=cache)

    @api.post("/v1/recommend", response_model=s.Answer)
    async def recommend(self, body: s.RecommendRequest, response: Response) -> s.Answer:
        query = self._query(body)
        if query["items"] is None:
            self._weights(body.tasks, await self._tasks(response))
            return self._cold(query, body.user_id, body.k)
        out = await self._call(self.retrieval, {**query, "k": max(body.k, self.cfg.retrieval.candidates),
                                                "exclude_history": self.cfg.retrieval.exclude_history}, response)
        ranked, cache = await self._rank(query, out["items"], body.tasks, response)
        return s.Answer(model=self._model(), user_id=body.user_id, items=[self._item(*r) for r in ranked[:body.k]],
                        history_used=len(query["items"]), unknown_items=query["unknown"], cache=cache)

    @api.get("/v1/users", response_model=list[str])
    async def users(self, limit: int = Query(50, ge=1, le=1000)) -> list[str]:
        return self.store.users(limit)

    @api.get("/v1/users/{user_id}/history", response_model=s.HistoryAnswer)
    async def history(self, user_id: str = PathParam(max_length=s.MAX_ID_CHARS),
                      limit: int = Query(50, ge=1, le=s.MAX_HISTORY)) -> s.HistoryAnswer:
        history = self.store.history(user_key(user_id))
        events = []
        if history is not None:
            for d, a, t in zip(*(x[-limit:].tolist() for x in (history.items, history.actions, history.timestamps))):
                meta = self.catalog.item(d)
                events.append(s.HistoryEvent(action=self.catalog.action_name(a), timestamp=t, **meta))
        return s.HistoryAnswer(user_id=user_id, known=history is not None, events=events)

    # ------------------------------------------------------------------ writes

    @api.post("/v1/events", response_model=s.EventsAnswer)
    async def events(self, body: s.EventsRequest, request: Request) -> s.EventsAnswer:
        """Append events to a user's history (needs `Authorization: Bearer <token>`); the next request sees them."""
        self._authorize(request)
        history, _ = self._events(body.events, int(time.time()), "events", strict=True)
        length = await asyncio.to_thread(self.store.append, user_key(body.user_id), history.items,
                                         history.actions, history.timestamps)
        return s.EventsAnswer(user_id=body.user_id, appended=history.version, history_length=length)

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            raise HTTPException(403, "writes are disabled: no token configured (auth.token or $"
                                     f"{self.cfg.auth.token_env})")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, "a valid bearer token is required for writes",
                                headers={"WWW-Authenticate": "Bearer"})


# ---------------------------------------------------------------------------- building and running

def serve_settings(args: dict, origin: str = "application args") -> ServeConfig:
    try:
        return ServeConfig.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(_describe(err, origin)) from None


def make_app(args: dict, deployments: list[dict] = ()):
    """The bound application; `deployments` are Serve options per deployment name (autoscaling_config,
    max_ongoing_requests, num_replicas, ray_actor_options, ...), as in a Serve config file."""
    cfg = serve_settings(args)
    source = asdict(resolve_model(cfg.model.uri, absolute_tracking_uri(cfg.model.tracking_uri)))
    settings = cfg.model_dump(mode="json")
    options = {}
    for d in deployments:
        d = dict(d)
        name = d.pop("name", None)
        if name not in DEPLOYMENTS:
            raise ConfigError(f"deployments: unknown deployment {name!r}; expected one of {list(DEPLOYMENTS)}")
        options[name] = d
    built = {}
    for name, cls in (("Retrieval", Retrieval), ("Ranking", Ranking), ("Ingress", Ingress)):
        try:
            built[name] = cls.options(**options.get(name, {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"deployments.{name}: {err}") from None
    return built["Ingress"].bind(built["Retrieval"].bind(settings, source), built["Ranking"].bind(settings, source),
                                 settings, source, str(resolve_path(".")))


def absolute_tracking_uri(uri: str | None) -> str:
    """The replicas run elsewhere (another working directory, maybe another node): pin the tracking
    URI the driver means. Default $MLFLOW_TRACKING_URI, else outputs/mlflow.db as training writes it."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///outputs/mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{resolve_path(uri.removeprefix('sqlite:///'))}"
    return uri


def build_app(args: dict):
    """Serve's application builder (import_path genrec.serve.app:build_app in a Serve config file)."""
    return make_app(args)


def load_serve_file(path: str | Path, overrides: list[str] = ()) -> dict:
    """A Serve config file with `--set` overrides: `model.uri=...` sets the genrec app's args,
    `deployments.Ranking.num_replicas=2` a deployment option, `http_options.port=8001` Serve's own."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"serve config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    apps = tree.get("applications")
    if not isinstance(apps, list) or len(apps) != 1:
        raise ConfigError(f"{path}: applications must list exactly one application (the genrec app)")
    app = apps[0]
    for text in overrides:
        key, value = parse_override(text)
        head, _, rest = key.partition(".")
        if head == "deployments" and rest.count(".") >= 1:
            name, _, option = rest.partition(".")
            entries = app.setdefault("deployments", [])
            entry = next((d for d in entries if d.get("name") == name), None)
            if entry is None:
                entries.append(entry := {"name": name})
            entry[option] = value
        elif head == "http_options" and rest:
            tree.setdefault("http_options", {})[rest] = value
        else:
            node = app.setdefault("args", {})
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    serve_settings(app.get("args"), f"{path} applications[0].args")
    return tree


def start(tree: dict, port: int | None = None) -> str:
    """Start Serve on the connected Ray cluster with a loaded Serve config file -> the base URL.
    Binds http_options.host, 127.0.0.1 unless the file says otherwise."""
    http = dict(tree.get("http_options") or {})
    http.setdefault("host", "127.0.0.1")
    if port is not None:
        http["port"] = port
    http.setdefault("port", 8000)
    serve.start(http_options={k: http[k] for k in ("host", "port", "request_timeout_s") if k in http})
    app = tree["applications"][0]
    serve.run(make_app(app.get("args"), app.get("deployments", [])), name=app.get("name", "genrec"),
              route_prefix=app.get("route_prefix", "/"))
    return f"http://{http['host']}:{http['port']}"
