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
from http import HTTPStatus

from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServeConfig
from . import schemas as s
from .answers import Recommender, encode_events, model_ref
from .page import PAGE
from .rollout import ModelVersions
from .store import StoreUnavailable, user_key


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
                raise self.error()
            return message

        return await self.app(scope, counted, send)

    def error(self) -> HTTPException:
        return s.api_error(413, ("body",), f"request body over {self.limit} bytes (the documented limit)", "too_large")

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"detail": self.error().detail}, 413)
        await response(scope, receive, send)


# What each error status means, in the OpenAPI schema of the routes that can answer it (body: s.ErrorBody).
ERRORS = {
    400: "the body is not readable as JSON (not UTF-8, or nested too deeply)",
    401: "no valid bearer token (`Authorization: Bearer <token>`); checked before the body is read",
    403: "writes are disabled: the app has no token configured",
    413: f"the body is over {s.MAX_BODY_BYTES} bytes (any route)",
    422: "the request is not one the API takes, `loc` says where and `type` what: a field out of its schema, or "
         "what the schema cannot say, as it depends on the model served: an unknown action (unknown_action), task "
         "(unknown_task), an unknown item in a write or no known candidate to rank (unknown_item), a request_time "
         "before the history's last event (request_time_before_history)",
    503: "no model replica or history store could answer (after retries); try again",
}


def errors(*statuses: int) -> dict:
    return {status: {"model": s.ErrorBody, "description": ERRORS[status]} for status in statuses}


def json_safe(text) -> str:
    """Text any JSON encoder takes: a lone surrogate (from a "\\ud800" escape in a key) written as its escape."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


bearer = HTTPBearer(auto_error=False, description="the write token (auth.token, or the variable auth.token_env names)")


def authorize(credentials: HTTPAuthorizationCredentials | None, token: str | None, token_env: str) -> None:
    """A write needs `Authorization: Bearer <token>`; without a configured token writes are disabled."""
    if token is None:
        raise s.api_error(403, ("header", "authorization"),
                          f"writes are disabled: no token configured (auth.token or ${token_env})", "writes_disabled")
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise s.api_error(401, ("header", "authorization"), "a valid bearer token is required for writes",
                          "unauthorized", headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as `model`, read by a route that must check something first (a write's token): a body that
    is not `model` is the same 422 as in a route whose body FastAPI reads."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None


def body_schema(model: type[BaseModel]) -> dict:
    """openapi_extra documenting the body of a route that reads it with read_body (the models it refers to are
    in the schema's components through the routes whose body FastAPI reads)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def ranker_info(live) -> s.RankerInfo | None:
    source, catalog = live.ranker_source, live.ranker_catalog
    if source is None:
        return None
    return s.RankerInfo(name=source.name, version=source.version, uri=source.uri, run_id=source.run_id,
                        kind=catalog.experiment.model.kind, max_seq_len=catalog.kept_items, metrics=source.metrics)


class IdConvertor(PathConvertor):
    """A path parameter that is an id as written, whatever its characters: a "/" (sent as %2F) or a newline."""

    regex = "(?s:.+)"


register_url_convertor("id", IdConvertor())
api = FastAPI(title="genrec", version="1", description=s.__doc__)
api.add_middleware(BodyLimit)


@api.exception_handler(RequestValidationError)
async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """422 with an ErrorBody. FastAPI's own handler echoes the bad input, which JSON may not encode (NaN, a lone
    surrogate): a 500 for bad input. The input is left out; loc and msg say what was wrong and where."""
    detail = []
    for e in err.errors():
        msg = e["msg"] + (f": {e['ctx']['error']}" if e["type"] == "json_invalid" and "ctx" in e else "")
        detail.append(s.ErrorDetail(loc=[p if isinstance(p, int) else json_safe(p) for p in e["loc"]],
                                    msg=json_safe(msg), type=e["type"]).model_dump())
    return JSONResponse({"detail": detail}, 422)


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Every error answer is an ErrorBody, also those of the framework (404, 405, a body that is not JSON)."""
    detail = err.detail
    if not isinstance(detail, list):
        kind = HTTPStatus(err.status_code).phrase.lower().replace(" ", "_")
        detail = [s.ErrorDetail(loc=[], msg=json_safe(detail), type=kind).model_dump()]
    return JSONResponse({"detail": detail}, err.status_code, headers=err.headers)


@api.exception_handler(StoreUnavailable)
async def store_unavailable(request: Request, err: StoreUnavailable) -> JSONResponse:
    """The history store cannot be reached (Redis down): a 503 on any route that reads or writes it, not a 500."""
    return JSONResponse({"detail": [s.ErrorDetail(loc=[], msg=json_safe(str(err)), type="store_unavailable")
                                    .model_dump()]}, 503)


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

    @api.get("/healthz", responses=errors(413))
    async def healthz(self) -> dict:
        return {"status": "ok", "model": model_ref(self.versions.live).model_dump()}

    @api.get("/v1/model", response_model=s.ModelInfo, responses=errors(413))
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
                                   "max_events": s.MAX_EVENTS, "max_seq_len": catalog.kept_items},
                           ranker=ranker_info(live))

    @api.post("/v1/retrieve", response_model=s.Answer, responses=errors(400, 413, 422, 503))
    async def retrieve(self, body: s.RetrieveRequest, response: Response) -> s.Answer:
        return await self.versions.answer(self.recommender.retrieve, body, response)

    @api.post("/v1/rank", response_model=s.Answer, responses=errors(400, 413, 422, 503))
    async def rank(self, body: s.RankRequest, response: Response) -> s.Answer:
        return await self.versions.answer(self.recommender.rank, body, response)

    @api.post("/v1/recommend", response_model=s.Answer, responses=errors(400, 413, 422, 503))
    async def recommend(self, body: s.RecommendRequest, response: Response) -> s.Answer:
        return await self.versions.answer(self.recommender.recommend, body, response)

    @api.get("/v1/users", response_model=list[str], responses=errors(413, 422))
    async def users(self, limit: int = Query(50, ge=1, le=1000)) -> list[str]:
        return self.versions.live.store.users(limit)

    @api.get("/v1/users/{user_id:id}/history", response_model=s.HistoryAnswer, responses=errors(413, 422))
    async def history(self, user_id: str = PathParam(min_length=1, max_length=s.MAX_ID_CHARS),
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

    @api.post("/v1/events", response_model=s.EventsAnswer, responses=errors(401, 403, 413, 422, 503),
              openapi_extra=body_schema(s.EventsRequest))
    async def events(self, request: Request,
                     credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> s.EventsAnswer:
        """Append events to a user's history (needs `Authorization: Bearer <token>`); the next request sees them.
        Idempotent: an event already stored (the same event_id, else item, action and timestamp) is not stored
        again, so a retry answers as the first write did. An event on an item the model does not know yet (a new
        item of the catalog) is logged for the next refresh and named in `new_items` (the embedded store; the
        redis store answers 422)."""
        authorize(credentials, self.token, self.cfg.auth.token_env)  # before the body is read: no token, no parsing
        body = await read_body(request, s.EventsRequest)
        live = self.versions.live
        events = encode_events(live, body.events, int(time.time()), "events")
        new_items = [e.item_id for e, n in zip(body.events, events.new_items) if n is not None]
        if new_items and not live.store.logs_new_items:
            raise s.api_error(422, ("body", "events"), f"unknown item ids {new_items[:20]} (not in the model's "
                              f"catalog; the {self.cfg.store.kind} store logs only events on known items)",
                              "unknown_item")
        appended = await asyncio.to_thread(live.store.append, user_key(body.user_id), events.items, events.actions,
                                           events.timestamps, [e.event_id for e in body.events], events.new_items)
        return s.EventsAnswer(user_id=body.user_id, appended=appended.events, new_items=new_items,
                              history_length=appended.history_length)
