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
        dense = live.catalog.dense.get(str(raw))
        if dense is None:
            unknown.append(raw)
        else:
            known.append(dense)
    return known, unknown


def request_history(live: Live, events: list[s.Event], now: int, field: str, strict: bool) -> tuple[History, list]:
    """Request events -> dense History; unknown items are dropped (strict: 422), unknown actions 422."""
    catalog = live.catalog
    items, actions, stamps, unknown = [], [], [], []
    for i, e in enumerate(events):
        action = catalog.action_id(e.action)
        if action is None:
            raise HTTPException(422, f"{field}[{i}].action: unknown action {e.action!r}; known: {catalog.actions}")
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


def model_call(live: Live, q: s.UserQuery) -> tuple[ModelCall | None, list]:
    """The history a request is about, cut to the model's N, as the model deployments take it (with the
    version that must score it; None when there is no history: a cold start), and the unknown item ids."""
    now = int(time.time()) if q.request_time is None else q.request_time
    unknown: list = []
    if q.history is not None:
        history, unknown = request_history(live, q.history, now, "history", strict=False)
        user = None
    else:
        user = user_key(q.user_id)
        history = live.store.history(user)
    version = history.version if history is not None else 0
    n = min(version, live.catalog.kept_items)
    if not n:
        return None, unknown
    return ModelCall(model=live.ref, user=user, version=version, request_time=now,
                     items=history.items[version - n:], actions=history.actions[version - n:],
                     timestamps=history.timestamps[version - n:], context=history.context,
                     seen=np.unique(history.items)), unknown


def model_ref(live: Live) -> s.ModelRef:
    return s.ModelRef(name=live.source.name, version=live.source.version)


def answer_item(live: Live, dense: int, score: float, scores: dict | None = None) -> s.Item:
    return s.Item(score=score, scores=scores, **live.catalog.item(dense))


def cold_answer(live: Live, user_id, k: int, unknown: list) -> s.Answer:
    """No history: the k most popular items."""
    items = [answer_item(live, int(d), float(live.counts[d])) for d in live.popular[:k]]
    return s.Answer(model=model_ref(live), user_id=user_id, items=items, cold_start=True, history_used=0,
                    unknown_items=unknown)


class Recommender:
    """What /v1/retrieve, /v1/rank and /v1/recommend answer with one live version (the ingress's routes
    call these through ModelVersions.answer, which falls back to the previous version)."""

    def __init__(self, cfg: ServeConfig, retrieval, ranking) -> None:
        self.cfg = cfg
        self.retrieval, self.ranking = retrieval, ranking

    async def retrieve(self, live: Live, body: s.RetrieveRequest, response: Response) -> s.Answer:
        call, unknown = model_call(live, body)
        if call is None:
            return cold_answer(live, body.user_id, body.k, unknown)
        out = await call_model(self.retrieval, dataclasses.replace(
            call, k=body.k, exclude_history=self.cfg.retrieval.exclude_history), response)
        items = [answer_item(live, d, v) for d, v in zip(out["items"], out["scores"])]
        return s.Answer(model=model_ref(live), user_id=body.user_id, items=items, history_used=len(call.items),
                        unknown_items=unknown, cache=out["cache"])

    async def rank(self, live: Live, body: s.RankRequest, response: Response) -> s.Answer:
        call, unknown = model_call(live, body)
        dense, unknown_candidates = dense_ids(live, body.candidates)
        unknown += unknown_candidates
        if call is None or not dense:
            self.task_weights(body.tasks, live.tasks)  # a bad task name is a 422 here too
            ranked = sorted(dense, key=lambda d: -live.counts[d])
            return s.Answer(model=model_ref(live), user_id=body.user_id, cold_start=call is None,
                            items=[answer_item(live, d, float(live.counts[d])) for d in ranked], history_used=0,
                            unknown_items=unknown)
        ranked, cache = await self._ranked(live, call, dense, body.tasks, response)
        return s.Answer(model=model_ref(live), user_id=body.user_id, items=[answer_item(live, *r) for r in ranked],
                        history_used=len(call.items), unknown_items=unknown, cache=cache)

    async def recommend(self, live: Live, body: s.RecommendRequest, response: Response) -> s.Answer:
        call, unknown = model_call(live, body)
        if call is None:
            self.task_weights(body.tasks, live.tasks)
            return cold_answer(live, body.user_id, body.k, unknown)
        out = await call_model(self.retrieval, dataclasses.replace(
            call, k=max(body.k, self.cfg.retrieval.candidates),
            exclude_history=self.cfg.retrieval.exclude_history), response)
        ranked, cache = await self._ranked(live, call, out["items"], body.tasks, response)
        return s.Answer(model=model_ref(live), user_id=body.user_id,
                        items=[answer_item(live, *r) for r in ranked[:body.k]], history_used=len(call.items),
                        unknown_items=unknown, cache=cache)

    def task_weights(self, requested: list[str] | None, tasks: list[str]) -> dict[str, float]:
        """The weights of the tasks a request combines (default all the model's); an unknown task is a 422."""
        chosen = requested or tasks
        unknown = [t for t in chosen if t not in tasks]
        if unknown:
            raise HTTPException(422, f"tasks: unknown {unknown}; this model scores {tasks}")
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
