"""The Ray Serve application's routes: a FastAPI ingress in front of two model deployments.

    Ingress    HTTP (FastAPI, OpenAPI at /docs): validation and limits, the history
               store, ids <-> dense indices, item metadata, cold start, auth on writes
    Retrieval  history -> top-k items by inner product over the whole item table
    Ranking    history + candidates -> per-task scores (M-FALCON for HSTU)

The parts: the model deployments (genrec.serve.replicas), how a request becomes model calls and an
answer (genrec.serve.answers), which version answers and how a new one rolls out in place
(genrec.serve.rollout), and the Serve config file, the app builder and `start` (genrec.serve.deploy:
import_path genrec.serve.deploy:build_app).
"""

import asyncio
import hmac
import os
import time

from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from ..config import ServeConfig
from . import schemas as s
from .answers import Recommender, model_ref, request_history
from .page import PAGE
from .rollout import ModelVersions
from .store import user_key


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


def authorize(request: Request, token: str | None, token_env: str) -> None:
    """A write needs `Authorization: Bearer <token>`; without a configured token writes are disabled."""
    if token is None:
        raise HTTPException(403, f"writes are disabled: no token configured (auth.token or ${token_env})")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "a valid bearer token is required for writes", headers={"WWW-Authenticate": "Bearer"})


api = FastAPI(title="genrec", version="1", description=s.__doc__)
api.add_middleware(BodyLimit)


# Serve pickles a deployment's class when it is decorated, by value (the module's name for it is the
# Deployment), with the module globals its methods use as they are at that point: a helper they call
# must be defined (or imported) above the class, or the replica gets a NameError.

@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, retrieval, ranking, settings: dict) -> None:
        """The model comes with the user_config (reconfigure), which Serve applies before any request."""
        self.cfg = ServeConfig.model_validate(settings)
        if self.cfg.store.root:
            os.environ["GENREC_ROOT"] = self.cfg.store.root  # for resolve_path in this replica's process
        self.token = self.cfg.auth.token or os.environ.get(self.cfg.auth.token_env) or None
        self.versions = ModelVersions(self.cfg, retrieval, ranking)
        self.recommender = Recommender(self.cfg, retrieval, ranking)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this before the first request and whenever only the user_config changed."""
        await self.versions.reconfigure(user_config)

    # ------------------------------------------------------------------ reads

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": model_ref(self.versions.live).model_dump()}

    @api.get("/v1/model", response_model=s.ModelInfo)
    async def model(self) -> s.ModelInfo:
        live = self.versions.live
        source, catalog = live.source, live.catalog
        return s.ModelInfo(name=source.name, version=source.version, uri=source.uri, run_id=source.run_id,
                           kind=catalog.experiment.model.kind, tasks=live.tasks,
                           task_weights={t: self.cfg.ranking.task_weights.get(t, 1.0) for t in live.tasks},
                           actions=catalog.actions, num_items=catalog.num_items, max_seq_len=catalog.kept_items,
                           metrics=source.metrics, rollout=self.versions.status,
                           retrieval_index=self.cfg.retrieval.index,
                           limits={"max_body_bytes": s.MAX_BODY_BYTES, "max_k": s.MAX_K,
                                   "max_candidates": s.MAX_CANDIDATES, "max_history": s.MAX_HISTORY,
                                   "max_events": s.MAX_EVENTS, "max_seq_len": catalog.kept_items})

    @api.post("/v1/retrieve", response_model=s.Answer)
    async def retrieve(self, body: s.RetrieveRequest, response: Response) -> s.Answer:
        return await self.versions.answer(self.recommender.retrieve, body, response)

    @api.post("/v1/rank", response_model=s.Answer)
    async def rank(self, body: s.RankRequest, response: Response) -> s.Answer:
        return await self.versions.answer(self.recommender.rank, body, response)

    @api.post("/v1/recommend", response_model=s.Answer)
    async def recommend(self, body: s.RecommendRequest, response: Response) -> s.Answer:
        return await self.versions.answer(self.recommender.recommend, body, response)

    @api.get("/v1/users", response_model=list[str])
    async def users(self, limit: int = Query(50, ge=1, le=1000)) -> list[str]:
        return self.versions.live.store.users(limit)

    @api.get("/v1/users/{user_id}/history", response_model=s.HistoryAnswer)
    async def history(self, user_id: str = PathParam(max_length=s.MAX_ID_CHARS),
                      limit: int = Query(50, ge=1, le=s.MAX_HISTORY)) -> s.HistoryAnswer:
        live = self.versions.live
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
        authorize(request, self.token, self.cfg.auth.token_env)
        live = self.versions.live
        history, _ = request_history(live, body.events, int(time.time()), "events", strict=True)
        length = await asyncio.to_thread(live.store.append, user_key(body.user_id), history.items,
                                         history.actions, history.timestamps)
        return s.EventsAnswer(user_id=body.user_id, appended=history.version, history_length=length)
