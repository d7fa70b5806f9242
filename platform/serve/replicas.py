"""The model deployments: Retrieval (history -> top-k items by inner product over the whole item
table, or an ANN index) and Ranking (history + candidates -> per-task scores, M-FALCON for HSTU).

Both batch requests of different users together (@serve.batch, sizes from the config) and run torch
off the event loop. A request is a `ModelCall` naming the version that must score it; a replica keeps
the newest MAX_LOADED versions, loading one at its first request for it (or when a rollout asks,
`prepare`), so requests in flight finish on the version they started with during a rollout.
"""

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict

import torch
from ray import serve

from ..config import ServeConfig
from .model import ModelCall, ModelLoadError, ModelSource, Scorer, fetched, serving_device

MAX_LOADED = 2  # versions a model replica keeps: the outgoing and the incoming one during a rollout
# A version a model replica failed to load is tried again at a request this long after, not at every request:
# meanwhile the ingress answers those requests with the previous version at no extra cost, and a passing
# failure (the artifact store unreachable) still heals by itself.
LOAD_RETRY_S = 10.0


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

    def _scorer(self, source: ModelSource) -> Scorer:
        """The model a request names, loaded on first use (in a worker thread: scoring goes on meanwhile)."""
        scorer = self.scorers.get(source.uri)
        if scorer is None:
            with self.loading:  # one load at a time; a second request for the same version waits for it
                scorer = self.scorers.get(source.uri)
                if scorer is None:
                    scorer = self._load(source)
        with contextlib.suppress(KeyError):  # a load in another thread evicted it meanwhile: this batch still has it
            self.scorers.move_to_end(source.uri)
        return scorer

    def _load(self, source: ModelSource) -> Scorer:
        """Load a version (under self.loading), keeping the newest MAX_LOADED; a failure is remembered for
        LOAD_RETRY_S."""
        at, error = self.failed.get(source.uri, (-LOAD_RETRY_S, ""))
        if time.monotonic() - at < LOAD_RETRY_S:
            raise ModelLoadError(error)
        try:
            with fetched(source) as folder:
                scorer = Scorer(folder, self.cfg.ranking.cache_bytes, self.cfg.ranking.microbatch,
                                self._index_config(), serving_device(self.cfg.device))
        except Exception as err:
            error = f"model {source.uri} did not load: {type(err).__name__}: {err}"
            self.failed[source.uri] = (time.monotonic(), error)
            raise ModelLoadError(error) from err
        self.failed.pop(source.uri, None)
        self.scorers[source.uri] = scorer
        while len(self.scorers) > MAX_LOADED:
            self.scorers.popitem(last=False)
        return scorer

    def _index_config(self):
        """Which item index the Scorer builds: none but the exact one (Ranking never searches the table)."""
        return None

    async def prepare(self, source: ModelSource) -> dict:
        """Load a version before the ingress switches to it (a failure here keeps the old one live). A rollout
        always tries, however recently this replica failed to load the version."""
        self.failed.pop(source.uri, None)
        scorer = await asyncio.to_thread(self._scorer, source)
        return {"tasks": scorer.tasks}

    def _score(self, calls: list[ModelCall]) -> list:
        """A batch, grouped by the version each call names (two during a rollout). A version that does not
        load fails only its own calls (their answer is the ModelLoadError): the ingress answers those with
        the previous version, which this same batch may be scoring for other calls."""
        out: list = [None] * len(calls)
        groups: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(call.model.uri, []).append(i)
        for rows in groups.values():
            try:
                scorer = self._scorer(calls[rows[0]].model)
            except ModelLoadError as err:
                for i in rows:
                    out[i] = err
                continue
            for i, answer in zip(rows, getattr(scorer, self.method)([calls[i] for i in rows])):
                out[i] = answer
        return out

    async def __call__(self, call: ModelCall) -> dict:
        answer = await self.batched(call)
        if isinstance(answer, ModelLoadError):  # @serve.batch fails a whole batch on a raise: raise per request
            raise answer
        return answer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def batched(self, calls: list[ModelCall]) -> list[dict]:
        return await asyncio.to_thread(self._score, calls)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Retrieval(_ModelReplica):
    method = "retrieve"

    def _index_config(self):
        return self.cfg.retrieval


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Ranking(_ModelReplica):
    method = "rank"
