"""From an HTTP request to the model calls and back, for one live version: raw ids -> dense indices,
the user's history cut to the model's N (a ModelCall), the model replicas' scores -> an Answer with the
items' metadata; the cold-start answer (popular items) for a user without history.

The ingress retries a call whose model replica died (up to MODEL_CALL_ATTEMPTS attempts, counted in
the `x-genrec-retries` response header), so losing a replica loses no request.
"""

import dataclasses
import logging
import time

import numpy as np
from fastapi import HTTPException, Response
from ray.exceptions import ActorUnavailableError, RayActorError

from ..config import ServeConfig
from . import schemas as s
from .model import ModelCall
from .rollout import Live
from .store import History, user_key

log = logging.getLogger("genrec.serve")
MODEL_CALL_ATTEMPTS = 3


async def call_model(handle, call: ModelCall, response: Response) -> dict:
    """A model call, retried on another replica when the one it reached died."""
    for attempt in range(MODEL_CALL_ATTEMPTS):
        try:
            result = await handle.remote(call)
            break
        except (RayActorError, ActorUnavailableError) as err:
            if attempt == MODEL_CALL_ATTEMPTS - 1:
                raise HTTPException(503, f"model replica unavailable after {MODEL_CALL_ATTEMPTS} attempts") from err
            log.warning("model replica failed (%s); retrying", type(err).__name__)
    retries = int(response.headers.get("x-genrec-retries", 0)) + attempt
    response.headers["x-genrec-retries"] = str(retries)
    return result


def dense_ids(live: Live, ids) -> tuple[list[int], list]:
    """Raw item ids -> (dense indices of the known ones, the unknown raw ids)."""
    known, unknown = [], []
    for raw in ids:
        dense = live.catalog.ids.dense(raw)
        if dense is None:
            unknown.append(raw)
        else:
            known.append(dense)
    return known, unknown


def request_history(live: Live, events: list[s.Event], now: int, field: str) -> tuple[History, list]:
    """Request events -> (dense History of the known items' events, the unknown raw item ids); an unknown
    action is a 422."""
    encoded = encode_events(live, events, now, field)
    known = encoded.items > 0
    history = History(encoded.items[known], encoded.actions[known], encoded.timestamps[known])
    return history, [n for n in encoded.new_items if n is not None]


@dataclasses.dataclass
class EncodedEvents:
    """Request events in the store's terms, one entry per event: dense item ids (0 for an item the model does
    not know: its raw id, as text, in new_items), action ids, timestamps."""

    items: np.ndarray
    actions: np.ndarray
    timestamps: np.ndarray
    new_items: list


def encode_events(live: Live, events: list[s.Event], now: int, field: str) -> EncodedEvents:
    catalog = live.catalog
    items, actions, stamps, new_items = [], [], [], []
    for i, e in enumerate(events):
        action = catalog.action_id(e.action)
        if action is None:
            raise s.api_error(422, ("body", field, i, "action"),
                              f"unknown action {e.action!r}; known: {catalog.actions}", "unknown_action")
        dense = catalog.ids.dense(e.item_id)
        items.append(dense or 0)
        new_items.append(None if dense is not None else str(e.item_id))
        actions.append(action)
        stamps.append(now if e.timestamp is None else e.timestamp)
    return EncodedEvents(*(np.asarray(a, dtype=np.int64) for a in (items, actions, stamps)), new_items)


@dataclasses.dataclass
class Query:
    """What a request is about: the user's whole history (read once per request), the store's key of a
    stored user (None for a history given in the request), the time the answer is for, unknown item ids."""

    history: History | None
    user: str | None
    now: int
    unknown: list


def read_query(live: Live, q: s.UserQuery) -> Query:
    now = int(time.time()) if q.request_time is None else q.request_time
    if q.history is not None:
        user = None
        history, unknown = request_history(live, q.history, now, "history")
    else:
        user, unknown = user_key(q.user_id), []
        history = live.store.history(user)
    if q.request_time is not None and history is not None and history.version and history.timestamps.max() > now:
        raise s.api_error(422, ("body", "request_time"), f"request_time {now} is before the history's last event "
                          f"({int(history.timestamps.max())}): an answer is for a time after its history",
                          "request_time_before_history")
    return Query(history, user, now, unknown)


def model_call(live: Live, query: Query, ranker: bool = False) -> ModelCall | None:
    """The query's history cut to the N of the model that scores it (the retrieval model, or the ranker), as
    the model deployments take it, with the version that must score it; None without history (a cold start)."""
    history = query.history
    version = history.version if history is not None else 0
    n = min(version, live.ranker_kept_items if ranker else live.catalog.kept_items)
    if not n:
        return None
    return ModelCall(model=live.ranker_ref if ranker else live.ref, user=query.user, version=version,
                     request_time=query.now, items=history.items[version - n:], actions=history.actions[version - n:],
                     timestamps=history.timestamps[version - n:], context=history.context,
                     seen=np.unique(history.items))


def model_ref(live: Live) -> s.ModelRef:
    return s.ModelRef(name=live.source.name, version=live.source.version)


def ranker_ref(live: Live) -> s.ModelRef | None:
    """The separate ranking model that scored an answer's order, if one is configured."""
    ranker = live.ranker_source
    return s.ModelRef(name=ranker.name, version=ranker.version) if ranker else None


def answer_item(live: Live, dense: int, score: float, scores: dict | None = None) -> s.Item:
    return s.Item(score=score, scores=scores, **live.catalog.item(dense))


def popular_item(live: Live, dense: int) -> s.Item:
    """An item of a cold-start answer: no model scored it, its popularity ordered it."""
    return s.Item(score=None, popularity=int(live.counts[dense]), **live.catalog.item(dense))


def cold_answer(live: Live, user_id, k: int, unknown: list) -> s.Answer:
    """No history: the k most popular items."""
    items = [popular_item(live, int(d)) for d in live.popular[:k]]
    return s.Answer(model=model_ref(live), user_id=user_id, items=items, cold_start=True, history_used=0,
                    unknown_items=unknown)


class Recommender:
    """What /v1/retrieve, /v1/rank and /v1/recommend answer with one live version (the ingress's routes
    call these through ModelVersions.answer, which falls back to the previous version)."""

    def __init__(self, cfg: ServeConfig, retrieval, ranking) -> None:
        self.cfg = cfg
        self.retrieval, self.ranking = retrieval, ranking

    async def retrieve(self, live: Live, body: s.RetrieveRequest, response: Response) -> s.Answer:
        query = read_query(live, body)
        call, unknown = model_call(live, query), query.unknown
        if call is None:
            return cold_answer(live, body.user_id, body.k, unknown)
        out = await call_model(self.retrieval, dataclasses.replace(
            call, k=body.k, exclude_history=self.cfg.retrieval.exclude_history), response)
        items = [answer_item(live, d, v) for d, v in zip(out["items"], out["scores"])]
        return s.Answer(model=model_ref(live), user_id=body.user_id, items=items, history_used=len(call.items),
                        unknown_items=unknown, cache=out["cache"])

    async def rank(self, live: Live, body: s.RankRequest, response: Response) -> s.Answer:
        query = read_query(live, body)
        call, unknown = model_call(live, query, ranker=True), query.unknown
        dense, unknown_candidates = dense_ids(live, body.candidates)
        unknown += unknown_candidates
        if not dense:
            raise s.api_error(422, ("body", "candidates"), f"none of the candidates is in the model's catalog "
                              f"(unknown: {unknown_candidates[:20]}): nothing to rank", "unknown_item")
        if call is None:
            self.task_weights(body.tasks, live.tasks)  # a bad task name is a 422 here too
            ranked = sorted(dense, key=lambda d: -live.counts[d])
            return s.Answer(model=model_ref(live), user_id=body.user_id, cold_start=True,
                            items=[popular_item(live, d) for d in ranked], history_used=0, unknown_items=unknown)
        ranked, cache = await self._ranked(live, call, dense, body.tasks, response)
        return s.Answer(model=model_ref(live), ranker=ranker_ref(live), user_id=body.user_id,
                        items=[answer_item(live, *r) for r in ranked], history_used=len(call.items),
                        unknown_items=unknown, cache=cache)

    async def recommend(self, live: Live, body: s.RecommendRequest, response: Response) -> s.Answer:
        """Retrieve retrieval.candidates items with the retrieval model, rank them with the ranker (M-FALCON)."""
        query = read_query(live, body)
        call, unknown = model_call(live, query), query.unknown
        if call is None:
            self.task_weights(body.tasks, live.tasks)
            return cold_answer(live, body.user_id, body.k, unknown)
        out = await call_model(self.retrieval, dataclasses.replace(
            call, k=max(body.k, self.cfg.retrieval.candidates),
            exclude_history=self.cfg.retrieval.exclude_history), response)
        ranked, cache = await self._ranked(live, model_call(live, query, ranker=True), out["items"], body.tasks,
                                           response)
        return s.Answer(model=model_ref(live), ranker=ranker_ref(live), user_id=body.user_id,
                        items=[answer_item(live, *r) for r in ranked[:body.k]], history_used=len(call.items),
                        unknown_items=unknown, cache=cache)

    def task_weights(self, requested: list[str] | None, tasks: list[str]) -> dict[str, float]:
        """The weights of the tasks a request combines (default all the model's); an unknown task is a 422."""
        chosen = requested or tasks
        unknown = [t for t in chosen if t not in tasks]
        if unknown:
            raise s.api_error(422, ("body", "tasks"), f"unknown tasks {unknown}; this model scores {tasks}",
                              "unknown_task")
        return {t: self.cfg.ranking.task_weights.get(t, 1.0) for t in chosen}

    async def _ranked(self, live: Live, call: ModelCall, dense: list[int], requested,
                      response: Response) -> tuple[list[tuple], str]:
        """-> [(dense, combined, {task: score})] best first, and what the user cache did."""
        weights = self.task_weights(requested, live.tasks)
        out = await call_model(self.ranking, dataclasses.replace(
            call, candidates=np.asarray(dense, dtype=np.int64)), response)
        ranked = []
        for d, row in zip(dense, out["scores"]):
            scores = {t: float(v) for t, v in zip(live.tasks, row) if t in weights}
            ranked.append((d, sum(weights[t] * v for t, v in scores.items()), scores))
        ranked.sort(key=lambda r: -r[1])
        return ranked, out["cache"]
