"""The Ray Serve application: a FastAPI ingress in front of two model deployments.

    Ingress    HTTP (FastAPI, OpenAPI at /docs): validation and limits, the history
               store, ids <-> dense indices, item metadata, cold start, auth on writes
    Retrieval  history -> top-k items by inner product over the whole item table (exact)
    Ranking    history + candidates -> per-task scores (M-FALCON for HSTU)

Retrieval and Ranking batch requests of different users together (@serve.batch,
sizes from the config) and run torch off the event loop. The ingress retries a
call whose model replica died (up to MODEL_CALL_ATTEMPTS attempts, counted in the
`x-genrec-retries` response header), so losing a replica loses no request.

Rollouts. The model served is the Ingress deployment's `user_config` (ServeUserConfig),
not an app argument: when only it changes, `serve deploy` (or `start` again with the
new file) makes Serve call `Ingress.reconfigure` on the running replicas instead of
replacing them. The ingress then resolves the URI to one version, loads its catalog,
has a Retrieval and a Ranking replica load its weights, and only then swaps: each
request reads the live model once and names its version to the model deployments,
whose replicas keep the newest MAX_LOADED versions, so requests in flight finish on
the version they started with and every answer names the version that scored it.
The other model replicas load the new version at their first request for it; if such
a late load fails, that request is answered whole by the previous version (and says
so), and the ingress reports it (rollout state degraded). A load that fails during
the rollout keeps the old version live, logs the error and reports it in
GET /v1/model (`rollout`); a replica started later (autoscaling, a restart) falls back
to the last version that went live (`<store.events_db>.model.json`) when the target
fails. With `model.watch_s` the ingress re-resolves the URI periodically, so moving an
alias in the MLflow registry rolls out the version it now names.

Start it from a Serve config file (configs/serve/*.yaml) with jobs/serve.py, or
`serve run` / `serve deploy` the same file (import_path genrec.serve.app:build_app).
"""


import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from ..config import ConfigError, ServeConfig, ServeUserConfig, describe_error, parse_override, resolve_path
from . import schemas as s
from .model import Catalog, ModelLoadError, ModelSource, Scorer, absolute_tracking_uri, fetched, resolve_model
from .page import PAGE
from .store import EmbeddedHistoryStore, History, user_key

log = logging.getLogger("genrec.serve")
MODEL_CALL_ATTEMPTS = 3
MAX_LOADED = 2  # versions a model replica keeps: the outgoing and the incoming one during a rollout
# A version a model replica failed to load is tried again at a request this long after, not at every request:
# meanwhile the ingress answers those requests with the previous version at no extra cost, and a passing
# failure (the artifact store unreachable) still heals by itself.
LOAD_RETRY_S = 10.0
DEPLOYMENTS = ("Ingress", "Retrieval", "Ranking")


# Serve pickles a deployment's class when it is decorated, by value (the module's name for it is the
# Deployment), with the module globals its methods use as they are at that point: a helper they call
# must be defined (or imported) above the class, or the replica gets a NameError.

class _ModelReplica:
    """One replica's loaded models (see Scorer), keyed by the pinned URI each request names."""

    method = ""  # the Scorer method a request runs

    def __init__(self, settings: dict) -> None:
        self.cfg = ServeConfig.model_validate(settings)
        torch.set_num_threads(self.cfg.torch_threads)
        self.scorers: OrderedDict[str, Scorer] = OrderedDict()
        self.failed: dict[str, tuple[float, str]] = {}  # uri -> when its load last failed, and why
        self.loading = threading.Lock()
        self.batched.set_max_batch_size(self.cfg.batching.max_batch_size)
        self.batched.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)

    def _scorer(self, ref: dict) -> Scorer:
        """The model a request names, loaded on first use (in a worker thread: scoring goes on meanwhile)."""
        scorer = self.scorers.get(ref["uri"])
        if scorer is None:
            with self.loading:  # one load at a time; a second request for the same version waits for it
                scorer = self.scorers.get(ref["uri"])
                if scorer is None:
                    at, error = self.failed.get(ref["uri"], (-LOAD_RETRY_S, ""))
                    if time.monotonic() - at < LOAD_RETRY_S:
                        raise ModelLoadError(error)
                    try:
                        with fetched(ModelSource(**ref)) as folder:
                            scorer = Scorer(folder, self.cfg.ranking.cache_bytes,
                                            self.cfg.ranking.microbatch, self._index_config())
                    except Exception as err:
                        error = f"model {ref['uri']} did not load: {type(err).__name__}: {err}"
                        self.failed[ref["uri"]] = (time.monotonic(), error)
                        raise ModelLoadError(error) from err
                    self.failed.pop(ref["uri"], None)
                    self.scorers[ref["uri"]] = scorer
                    while len(self.scorers) > MAX_LOADED:
                        self.scorers.popitem(last=False)
        with contextlib.suppress(KeyError):  # a load in another thread evicted it meanwhile: this batch still has it
            self.scorers.move_to_end(ref["uri"])
        return scorer

    def _index_config(self):
        """Which item index the Scorer builds: none but the exact one (Ranking never searches the table)."""
        return None

    async def prepare(self, ref: dict) -> dict:
        """Load a version before the ingress switches to it (a failure here keeps the old one live). A rollout
        always tries, however recently this replica failed to load the version."""
        self.failed.pop(ref["uri"], None)
        scorer = await asyncio.to_thread(self._scorer, ref)
        return {"tasks": scorer.tasks}

    def _score(self, requests: list[dict]) -> list:
        """A batch, grouped by the version each request names (two during a rollout). A version that does
        not load fails only its own requests (their answer is the ModelLoadError): the ingress answers those
        with the previous version, which this same batch may be scoring for other requests."""
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r["model"]["uri"], []).append(i)
        for rows in groups.values():
            try:
                scorer = self._scorer(requests[rows[0]]["model"])
            except ModelLoadError as err:
                for i in rows:
                    out[i] = err
                continue
            for i, answer in zip(rows, getattr(scorer, self.method)([requests[i] for i in rows])):
                out[i] = answer
        return out

    async def __call__(self, request: dict) -> dict:
        answer = await self.batched(request)
        if isinstance(answer, ModelLoadError):  # @serve.batch fails a whole batch on a raise: raise per request
            raise answer
        return answer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def batched(self, requests: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._score, requests)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Retrieval(_ModelReplica):
    method = "retrieve"

    def _index_config(self):
        return self.cfg.retrieval


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Ranking(_ModelReplica):
    method = "rank"


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


@dataclass
class Live:
    """The model the ingress answers with, and what goes with it. Swapped whole by a rollout:
    a request reads `Ingress.live` once, so it sees one version from start to end."""

    source: ModelSource
    catalog: Catalog
    prepared: Path  # the sequence table's folder the store reads
    store: EmbeddedHistoryStore
    counts: np.ndarray  # events per item: the cold-start popularity
    popular: np.ndarray  # items with events, most frequent first
    tasks: list[str]

    @property
    def ref(self) -> dict:
        """What the model deployments need to find (or load) this version."""
        return {"uri": self.source.uri, "name": self.source.name, "version": self.source.version,
                "tracking_uri": self.source.tracking_uri}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, retrieval, ranking, settings: dict) -> None:
        """The model comes with the user_config (reconfigure), which Serve applies before any request."""
        self.cfg = ServeConfig.model_validate(settings)
        if self.cfg.store.root:
            os.environ["GENREC_ROOT"] = self.cfg.store.root  # for resolve_path in this replica's process
        self.retrieval, self.ranking = retrieval, ranking
        self.token = self.cfg.auth.token or os.environ.get(self.cfg.auth.token_env) or None
        self.events_db = resolve_path(self.cfg.store.events_db)
        self.last_good = self.events_db.with_name(self.events_db.name + ".model.json")
        self.live: Live | None = None
        self.previous: Live | None = None  # what answers a request whose model replica cannot load `live`
        self.target = None
        self.rollout = s.Rollout(state="loading")
        self.rolling = asyncio.Lock()
        self.watcher: asyncio.Task | None = None

    # ------------------------------------------------------------------ rollouts

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this before the first request and whenever only the user_config changed."""
        try:
            target = ServeUserConfig.model_validate(user_config or {}).model
        except ValidationError as err:
            error = ConfigError(describe_error(err, "Ingress user_config"))
            if self.live is None:
                raise error from None
            self._failed(str(user_config), error)
            return
        self.target = target
        await self.roll()
        if self.live is None:  # nothing to serve: the target failed and no version ever went live
            raise RuntimeError(f"could not load model {target.uri}: {self.rollout.error}")
        if self.watcher is not None:
            self.watcher.cancel()
        self.watcher = asyncio.get_running_loop().create_task(self._watch()) if target.watch_s else None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.target.watch_s)
            await self.roll()

    async def roll(self) -> None:
        """Resolve the target to one version; load it (the catalog here, the weights in a Retrieval and a
        Ranking replica), then swap. A failure keeps the live version, and is logged and reported."""
        async with self.rolling:
            target = self.target  # read under the lock: a reconfigure may have changed it while this waited
            try:
                source = await asyncio.to_thread(resolve_model, target.uri, absolute_tracking_uri(target.tracking_uri))
                if self.live is not None and source.uri == self.live.source.uri:
                    # e.g. the config went back to the version still live; degraded stays (a replica still cannot
                    # load it, as far as this ingress knows) until the next switch
                    if self.rollout.state not in ("live", "degraded"):
                        self.rollout = self.rollout.model_copy(update={"state": "live", "target": target.uri,
                                                                       "error": None, "at": time.time()})
                    return
                self.rollout = self.rollout.model_copy(update={"state": "loading", "target": target.uri})
                self._swap(await self._load(source), target.uri)
            except Exception as err:  # noqa: BLE001 - whatever broke the load, the live version stays
                self._failed(target.uri, err)
                if self.live is None:
                    await self._load_last_good()

    async def _load(self, source: ModelSource) -> Live:
        def read_catalog() -> Catalog:
            with fetched(source) as folder:
                return Catalog(folder)

        catalog = await asyncio.to_thread(read_catalog)
        prepared = resolve_path(self.cfg.store.sequences or catalog.experiment.data.output_dir)
        old = self.live
        if old is not None and old.prepared == prepared:
            store = old.store
        else:
            store = await asyncio.to_thread(EmbeddedHistoryStore, prepared, self.events_db)
        counts = store.item_counts()
        counts = np.pad(counts, (0, max(0, catalog.num_items + 1 - len(counts))))
        counts[0] = 0  # padding
        live = Live(source, catalog, prepared, store, counts,
                    np.argsort(-counts, kind="stable")[: int((counts > 0).sum())], tasks=[])
        # the weights, loaded by one replica of each model deployment (the others load on first use)
        ranked, _ = await asyncio.gather(self.ranking.prepare.remote(live.ref), self.retrieval.prepare.remote(live.ref))
        live.tasks = ranked["tasks"]
        return live

    def _swap(self, live: Live, target: str) -> None:
        previous = self.live.source.version if self.live is not None else None
        self.previous, self.live = self.live, live
        self.rollout = s.Rollout(state="live", target=target, version=live.source.version, previous=previous,
                                 at=time.time())
        log.warning("serving %s version %s (was %s)", live.source.name, live.source.version, previous)
        self.last_good.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.last_good.with_name(f"{self.last_good.name}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(live.source)))
        tmp.replace(self.last_good)  # atomic: another replica never reads half a file

    async def _load_last_good(self) -> None:
        """A replica started after a failed rollout: serve the version that last went live, the failure
        still reported (state failed)."""
        failed = self.rollout
        try:
            source = ModelSource(**json.loads(self.last_good.read_text()))
        except (OSError, ValueError, TypeError):
            return  # no version ever went live here
        try:
            self._swap(await self._load(source), failed.target)
        except Exception as err:  # noqa: BLE001
            log.error("the last live model (%s, %s) does not load either: %r", source.uri, self.last_good, err)
            return
        self.rollout = self.rollout.model_copy(update={"state": "failed", "error": failed.error})

    def _failed(self, target: str, err: Exception) -> None:
        err = getattr(err, "cause", None) or err  # a model replica's error arrives wrapped in a RayTaskError
        error = f"{type(err).__name__}: {err}"[:1000]
        serving = self.live.source.version if self.live is not None else None
        if (self.rollout.state, self.rollout.error) != ("failed", error):  # the watcher retries: log once
            log.error("rollout of %s failed, %s: %s", target, f"still serving version {serving}" if serving
                      else "nothing live yet (trying the last version that went live, if any)", error)
        self.rollout = self.rollout.model_copy(update={"state": "failed", "target": target, "error": error,
                                                       "version": serving, "at": time.time()})

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

    def _dense(self, live: Live, ids) -> tuple[list[int], list]:
        known, unknown = [], []
        for raw in ids:
            dense = live.catalog.dense.get(str(raw))
            if dense is None:
                unknown.append(raw)
            else:
                known.append(dense)
        return known, unknown

    def _events(self, live: Live, events: list[s.Event], now: int, field: str,
                strict: bool) -> tuple[History, list]:
        """Request events -> dense History; unknown items are dropped (strict: 422), unknown actions 422."""
        catalog = live.catalog
        items, actions, stamps, unknown = [], [], [], []
        for i, e in enumerate(events):
            action = catalog.action_id(e.action)
            if action is None:
                raise HTTPException(422, f"{field}[{i}].action: unknown action {e.action!r}; "
                                         f"known: {catalog.actions}")
            dense = catalog.dense.get(str(e.item_id))
            if dense is None:
                unknown.append(e.item_id)
                continue
            items.append(dense)
            actions.append(action)
            stamps.append(now if e.timestamp is None else e.timestamp)
        if strict and unknown:
            raise HTTPException(422, f"{field}: unknown item ids {unknown[:20]} (not in the model's catalog)")
        return History(*(np.asarray(a, dtype=np.int64) for a in (items, actions, stamps))), unknown

    def _query(self, live: Live, q: s.UserQuery) -> dict:
        """The history a request is about, cut to the model's N, as the model deployments take it
        (with the version that must score it)."""
        now = int(time.time()) if q.request_time is None else q.request_time
        unknown: list = []
        if q.history is not None:
            history, unknown = self._events(live, q.history, now, "history", strict=False)
            user = None
        else:
            user = user_key(q.user_id)
            history = live.store.history(user)
        version = history.version if history is not None else 0
        n = min(version, live.catalog.max_seq_len)
        return {"model": live.ref, "user": user, "version": version, "request_time": now, "unknown": unknown,
                "items": history.items[version - n:] if n else None,
                "seen": np.unique(history.items) if n else None,  # excluded from retrieval: all, not only the last N
                "timestamps": history.timestamps[version - n:] if n else None,
                "actions": history.actions[version - n:] if n else None, "context": history.context if n else ()}

    @staticmethod
    def _model(live: Live) -> s.ModelRef:
        return s.ModelRef(name=live.source.name, version=live.source.version)

    @staticmethod
    def _item(live: Live, dense: int, score: float, scores: dict | None = None) -> s.Item:
        return s.Item(score=score, scores=scores, **live.catalog.item(dense))

    def _cold(self, live: Live, query: dict, user_id, k: int) -> s.Answer:
        items = [self._item(live, int(d), float(live.counts[d])) for d in live.popular[:k]]
        return s.Answer(model=self._model(live), user_id=user_id, items=items, cold_start=True, history_used=0,
                        unknown_items=query["unknown"])

    def _weights(self, requested: list[str] | None, tasks: list[str]) -> dict[str, float]:
        chosen = requested or tasks
        unknown = [t for t in chosen if t not in tasks]
        if unknown:
            raise HTTPException(422, f"tasks: unknown {unknown}; this model scores {tasks}")
        return {t: self.cfg.ranking.task_weights.get(t, 1.0) for t in chosen}

    async def _rank(self, live: Live, query: dict, dense: list[int], requested, response: Response) -> list[tuple]:
        """-> [(dense, combined, {task: score})] best first."""
        weights = self._weights(requested, live.tasks)
        out = await self._call(self.ranking, {**query, "candidates": np.asarray(dense, dtype=np.int64)}, response)
        ranked = []
        for d, row in zip(dense, out["scores"]):
            scores = {t: float(v) for t, v in zip(live.tasks, row) if t in weights}
            ranked.append((d, sum(weights[t] * v for t, v in scores.items()), scores))
        ranked.sort(key=lambda r: -r[1])
        return ranked, out["cache"]

    # ------------------------------------------------------------------ reads

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self._model(self.live).model_dump()}

    @api.get("/v1/model", response_model=s.ModelInfo)
    async def model(self) -> s.ModelInfo:
        live = self.live
        source, catalog = live.source, live.catalog
        return s.ModelInfo(name=source.name, version=source.version, uri=source.uri, run_id=source.run_id,
                           kind=catalog.experiment.model.kind, tasks=live.tasks,
                           task_weights={t: self.cfg.ranking.task_weights.get(t, 1.0) for t in live.tasks},
                           actions=catalog.actions, num_items=catalog.num_items, max_seq_len=catalog.max_seq_len,
                           metrics=source.metrics, rollout=self.rollout, retrieval_index=self.cfg.retrieval.index,
                           limits={"max_body_bytes": s.MAX_BODY_BYTES, "max_k": s.MAX_K,
                                   "max_candidates": s.MAX_CANDIDATES, "max_history": s.MAX_HISTORY,
                                   "max_events": s.MAX_EVENTS, "max_seq_len": catalog.max_seq_len})

    async def _answer(self, handler, body, response: Response) -> s.Answer:
        """handler(live, body, response) with the live version. The model replicas that did not load it during
        the rollout load it at their first request for it; if that load fails (the artifact gone or unreadable
        since), the request is answered once more, whole, by the version served before (its catalog, its
        weights, its name in the answer), and the failure is logged and reported (rollout state degraded).
        A 503 only when there is no older version to answer with."""
        live = self.live
        try:
            return await handler(live, body, response)
        except ModelLoadError as err:
            fallback = self.previous if self.previous is not live else None
            error = getattr(err, "cause", None) or err  # the replica's error arrives wrapped in a RayTaskError
        if fallback is not None:
            self._fell_back(live, fallback, error)
            try:
                return await handler(fallback, body, response)
            except ModelLoadError as err:
                error = getattr(err, "cause", None) or err
        raise HTTPException(503, f"no model replica could load the version to answer with: {error}"[:1000])

    def _fell_back(self, live: Live, fallback: Live, error: Exception) -> None:
        error = (f"a model replica could not load version {live.source.version} (the requests it got are answered "
                 f"by version {fallback.source.version}): {error}")[:1000]
        if self.rollout.error != error:
            log.error("%s", error)
        update = {"fallbacks": self.rollout.fallbacks + 1, "error": error}
        if self.rollout.state != "degraded":
            update |= {"state": "degraded", "at": time.time()}
        self.rollout = self.rollout.model_copy(update=update)

    @api.post("/v1/retrieve", response_model=s.Answer)
    async def retrieve(self, body: s.RetrieveRequest, response: Response) -> s.Answer:
        return await self._answer(self._retrieve, body, response)

    @api.post("/v1/rank", response_model=s.Answer)
    async def rank(self, body: s.RankRequest, response: Response) -> s.Answer:
        return await self._answer(self._rank_answer, body, response)

    @api.post("/v1/recommend", response_model=s.Answer)
    async def recommend(self, body: s.RecommendRequest, response: Response) -> s.Answer:
        return await self._answer(self._recommend, body, response)

    async def _retrieve(self, live: Live, body: s.RetrieveRequest, response: Response) -> s.Answer:
        query = self._query(live, body)
        if query["items"] is None:
            return self._cold(live, query, body.user_id, body.k)
        out = await self._call(self.retrieval, {**query, "k": body.k,
                                                "exclude_history": self.cfg.retrieval.exclude_history}, response)
        items = [self._item(live, d, v) for d, v in zip(out["items"], out["scores"])]
        return s.Answer(model=self._model(live), user_id=body.user_id, items=items,
                        history_used=len(query["items"]), unknown_items=query["unknown"], cache=out["cache"])

    async def _rank_answer(self, live: Live, body: s.RankRequest, response: Response) -> s.Answer:
        query = self._query(live, body)
        dense, unknown = self._dense(live, body.candidates)
        query["unknown"] += unknown
        if query["items"] is None or not dense:
            self._weights(body.tasks, live.tasks)  # a bad task name is a 422 here too
            ranked = sorted(dense, key=lambda d: -live.counts[d])
            return s.Answer(model=self._model(live), user_id=body.user_id, cold_start=query["items"] is None,
                            items=[self._item(live, d, float(live.counts[d])) for d in ranked], history_used=0,
                            unknown_items=query["unknown"])
        ranked, cache = await self._rank(live, query, dense, body.tasks, response)
        return s.Answer(model=self._model(live), user_id=body.user_id, items=[self._item(live, *r) for r in ranked],
                        history_used=len(query["items"]), unknown_items=query["unknown"], cache=cache)

    async def _recommend(self, live: Live, body: s.RecommendRequest, response: Response) -> s.Answer:
        query = self._query(live, body)
        if query["items"] is None:
            self._weights(body.tasks, live.tasks)
            return self._cold(live, query, body.user_id, body.k)
        out = await self._call(self.retrieval, {**query, "k": max(body.k, self.cfg.retrieval.candidates),
                                                "exclude_history": self.cfg.retrieval.exclude_history}, response)
        ranked, cache = await self._rank(live, query, out["items"], body.tasks, response)
        return s.Answer(model=self._model(live), user_id=body.user_id,
                        items=[self._item(live, *r) for r in ranked[:body.k]], history_used=len(query["items"]),
                        unknown_items=query["unknown"], cache=cache)

    @api.get("/v1/users", response_model=list[str])
    async def users(self, limit: int = Query(50, ge=1, le=1000)) -> list[str]:
        return self.live.store.users(limit)

    @api.get("/v1/users/{user_id}/history", response_model=s.HistoryAnswer)
    async def history(self, user_id: str = PathParam(max_length=s.MAX_ID_CHARS),
                      limit: int = Query(50, ge=1, le=s.MAX_HISTORY)) -> s.HistoryAnswer:
        live = self.live
        history = live.store.history(user_key(user_id))
        events = []
        if history is not None:
            for d, a, t in zip(*(x[-limit:].tolist() for x in (history.items, history.actions, history.timestamps))):
                meta = live.catalog.item(d)
                events.append(s.HistoryEvent(action=live.catalog.action_name(a), timestamp=t, **meta))
        return s.HistoryAnswer(user_id=user_id, known=history is not None, events=events)

    # ------------------------------------------------------------------ writes

    @api.post("/v1/events", response_model=s.EventsAnswer)
    async def events(self, body: s.EventsRequest, request: Request) -> s.EventsAnswer:
        """Append events to a user's history (needs `Authorization: Bearer <token>`); the next request sees them."""
        self._authorize(request)
        live = self.live
        history, _ = self._events(live, body.events, int(time.time()), "events", strict=True)
        length = await asyncio.to_thread(live.store.append, user_key(body.user_id), history.items,
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
        raise ConfigError(describe_error(err, origin)) from None


def build_app(args: dict):
    """Serve's application builder (import_path genrec.serve.app:build_app in a Serve config file). The model
    is not an argument: it comes with the Ingress's user_config (see the module doc); the deployments'
    options (replicas, autoscaling, user_config, ...) are the config file's, applied by Serve."""
    settings = serve_settings(args).model_dump(mode="json")
    return Ingress.bind(Retrieval.bind(settings), Ranking.bind(settings), settings)


def load_serve_file(path: str | Path, overrides: list[str] = ()) -> dict:
    """A Serve config file with `--set` overrides: `model.uri=...` sets the model (the Ingress deployment's
    user_config), `batching.max_batch_size=8` the genrec app's args, `deployments.Ranking.num_replicas=2` a
    deployment option, `http_options.port=8001` Serve's own."""
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
            _set(_deployment(app, name), option.split("."), value)
        elif head == "http_options" and rest:
            tree.setdefault("http_options", {})[rest] = value
        elif head == "model":
            _set(_deployment(app, "Ingress"), ["user_config", *key.split(".")], value)
        else:
            _set(app, ["args", *key.split(".")], value)
    for d in app.get("deployments") or []:
        if d.get("name") not in DEPLOYMENTS:
            raise ConfigError(f"{path} applications[0].deployments: unknown deployment {d.get('name')!r}; "
                              f"expected one of {list(DEPLOYMENTS)}")
    serve_settings(app.get("args"), f"{path} applications[0].args")
    try:
        ServeUserConfig.model_validate(_deployment(app, "Ingress").get("user_config") or {})
    except ValidationError as err:
        raise ConfigError(describe_error(err, f"{path} applications[0].deployments.Ingress.user_config "
                                         "(the model served)")) from None
    return tree


def _deployment(app: dict, name: str) -> dict:
    entries = app.setdefault("deployments", [])
    entry = next((d for d in entries if d.get("name") == name), None)
    if entry is None:
        entries.append(entry := {"name": name})
    return entry


def _set(node: dict, keys: list[str], value) -> None:
    *parents, leaf = keys
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = value


def pin_paths(tree: dict) -> dict:
    """The tree with the paths it names made absolute, as the calling process means them: Serve builds the
    app and runs its replicas in other processes (another working directory, maybe another node)."""
    tree = json.loads(json.dumps(tree))
    app = tree["applications"][0]
    store = app.setdefault("args", {}).setdefault("store", {})
    store["root"] = str(resolve_path(store.get("root") or "."))
    for key in ("events_db", "sequences"):
        if store.get(key):
            store[key] = str(resolve_path(store[key]))
    store.setdefault("events_db", str(resolve_path(ServeConfig().store.events_db)))
    model = _deployment(app, "Ingress").setdefault("user_config", {}).setdefault("model", {})
    model["tracking_uri"] = absolute_tracking_uri(model.get("tracking_uri"))
    if model.get("uri") and resolve_path(model["uri"]).is_dir():
        model["uri"] = str(resolve_path(model["uri"]))
    return tree


def start(tree: dict, port: int | None = None, timeout_s: float = 600) -> str:
    """Deploy a loaded Serve config file on the connected Ray cluster, as `serve deploy` does -> the base URL.
    Binds http_options.host, 127.0.0.1 unless the file says otherwise; waits until the app runs. Called
    again with the same args and another model (the Ingress's user_config), it rolls the model out in place
    (see the module doc) and returns once the ingress has switched or reported the failure."""
    # Private, on purpose (Ray 2.60): a user_config-only change must reconfigure the running replicas, not
    # replace them, and only a config deploy does that (its code version is a hash of the import path and
    # runtime_env: deploy_utils.get_app_code_version). The public Python API cannot: serve.run deploys a built
    # app under a random code version each call (client.deploy_applications: `deployment._version or
    # get_random_string()`; .options(version=) is removed), so every call replaces every replica. The public
    # equivalents of these two calls are `serve deploy` / the REST API (PUT /api/serve/applications/), which
    # need the dashboard that tests and jobs/serve.py run without; `serve run config.yaml` itself makes exactly
    # these two calls (serve/scripts.py), and the dashboard's REST handler the second.
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    tree = pin_paths(tree)
    http = tree.setdefault("http_options", {})
    http.setdefault("host", "127.0.0.1")
    if port is not None:
        http["port"] = port
    http.setdefault("port", 8000)
    config = ServeDeploySchema.model_validate(tree)
    name = config.applications[0].name
    client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    client.deploy_apps(config)  # the controller marks the app DEPLOYING before this returns
    deadline = time.time() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "RUNNING":
            break
        if app is not None and app.status == "DEPLOY_FAILED" or time.time() > deadline:
            raise RuntimeError(f"the Serve app {name!r} did not start: "
                               f"{app.status if app else 'not deployed'} {app.message if app else ''}")
        time.sleep(0.5)
    return f"http://{http['host']}:{http['port']}"
