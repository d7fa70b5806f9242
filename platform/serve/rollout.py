"""Which model version an ingress replica answers with, and how it changes (the rollout state machine).

The model served is the Ingress deployment's `user_config` (ServeUserConfig), not an app argument: when
only it changes, `serve deploy` (or genrec.serve.deploy.start again with the new file) makes Serve call
`Ingress.reconfigure` on the running replicas instead of replacing them. The ingress then resolves the
URI to one version, loads its catalog, has a Retrieval and a Ranking replica load its weights, and only
then swaps: each request reads the live version once and names it to the model deployments, whose
replicas keep the newest versions, so requests in flight finish on the version they started with and
every answer names the version that scored it.

The other model replicas load the new version at their first request for it; if such a late load fails,
that request is answered whole by the previous version (and says so), and the ingress reports it
(state degraded). A load that fails during the rollout keeps the old version live, logs the error and
reports it in GET /v1/model (`rollout`); a replica started later (autoscaling, a restart) falls back to
the last version that went live (`<store.events_db>.model.json`) when the target fails. With
`model.watch_s` the ingress re-resolves the URI periodically, so moving an alias in the MLflow registry
rolls out the version it now names.
"""

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
from fastapi import HTTPException
from pydantic import ValidationError

from ..config import ConfigError, ServeConfig, ServeUserConfig, describe_error, resolve_path
from . import schemas as s
from .model import (Catalog, ModelLoadError, ModelSource, absolute_location, absolute_tracking_uri, fetched,
                    resolve_model)
from .store import HistoryStore
from .stores import open_history_store

log = logging.getLogger("genrec.serve")


@dataclass
class Live:
    """The models the ingress answers with, and what goes with them. Swapped whole by a rollout:
    a request reads `ModelVersions.live` once, so it sees one version (pair) from start to end."""

    source: ModelSource  # the retrieval model (which ranks too when no ranker is configured)
    catalog: Catalog
    prepared: str  # the prepared data the store reads its sequence table from: a path or an object-store URI
    store: HistoryStore
    counts: np.ndarray  # events per item: the cold-start popularity
    popular: np.ndarray  # items with events, most frequent first
    tasks: list[str]  # the ranking model's
    ranker_source: ModelSource | None = None  # a separate ranking model (ServeUserConfig.ranker)
    ranker_catalog: Catalog | None = None

    @cached_property
    def ref(self) -> ModelSource:
        return pinned(self.source)

    @cached_property
    def ranker_ref(self) -> ModelSource:
        return pinned(self.ranker_source or self.source)

    @property
    def ranker_kept_items(self) -> int:
        """The ranking model's N: the history events it sees."""
        return (self.ranker_catalog or self.catalog).kept_items

    @property
    def versions(self) -> str:
        """e.g. '3' or '3 + ranker 5': what a log line or a rollout report names."""
        ranker = f" + ranker {self.ranker_source.name} {self.ranker_source.version}" if self.ranker_source else ""
        return f"{self.source.version}{ranker}"


def pinned(source: ModelSource) -> ModelSource:
    """What the model deployments need to find (or load) a version: its source without the run's metrics,
    which would travel with every request."""
    return ModelSource(source.uri, source.name, source.version, tracking_uri=source.tracking_uri)


def check_same_catalog(retrieval: Catalog, ranker: Catalog, uri: str) -> None:
    """A ranker scores the items retrieval found by their dense ids, and reads the stored actions by id: both
    models must come from the same prepared data (the same vocabularies)."""
    if ranker.ids != retrieval.ids or ranker.actions != retrieval.actions:
        raise ModelLoadError(f"ranker {uri}: its item or action vocabulary differs from the retrieval model's "
                             f"({ranker.num_items} vs {retrieval.num_items} items, actions {ranker.actions} vs "
                             f"{retrieval.actions}); train both on the same prepared data")


def target_name(target: ServeUserConfig) -> str:
    """The URIs a user_config asks for, as the rollout reports them."""
    return target.model.uri + (f" + ranker {target.ranker.uri}" if target.ranker else "")


def watch_period(target: ServeUserConfig) -> float | None:
    """How often to re-resolve the URIs: the shorter watch_s of the two models, if either has one."""
    periods = [m.watch_s for m in (target.model, target.ranker) if m is not None and m.watch_s]
    return min(periods) if periods else None


class ModelVersions:
    """One ingress replica's versions: `live` answers, `previous` answers a request whose model replica
    cannot load `live`, `target` is the model the user_config names, and `status` is what GET /v1/model
    reports (schemas.Rollout: loading, live, failed or degraded)."""

    def __init__(self, cfg: ServeConfig, retrieval, ranking) -> None:
        self.cfg = cfg
        self.retrieval, self.ranking = retrieval, ranking
        self.events_db = resolve_path(cfg.store.events_db)
        self.last_good = self.events_db.with_name(self.events_db.name + ".model.json")
        self.live: Live | None = None
        self.previous: Live | None = None
        self.target = None
        self.status = s.Rollout(state="loading")
        self.rolling = asyncio.Lock()
        self.watcher: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict) -> None:
        """A new user_config (before the first request, and whenever only it changed): roll its model out."""
        try:
            target = ServeUserConfig.model_validate(user_config or {})
        except ValidationError as err:
            error = ConfigError(describe_error(err, "Ingress user_config"))
            if self.live is None:
                raise error from None
            self._failed(str(user_config), error)
            return
        self.target = target
        await self.roll()
        if self.live is None:  # nothing to serve: the target failed and no version ever went live
            raise RuntimeError(f"could not load model {target_name(target)}: {self.status.error}")
        if self.watcher is not None:
            self.watcher.cancel()
        self.watcher = asyncio.get_running_loop().create_task(self._watch()) if watch_period(target) else None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(watch_period(self.target))
            await self.roll()

    async def roll(self) -> None:
        """Resolve the target to one version; load it (the catalog here, the weights in a Retrieval and a
        Ranking replica), then swap. A failure keeps the live version, and is logged and reported."""
        async with self.rolling:
            target = self.target  # read under the lock: a reconfigure may have changed it while this waited
            name = target_name(target)
            try:
                source, ranker = await asyncio.gather(*(
                    asyncio.to_thread(resolve_model, m.uri, absolute_tracking_uri(m.tracking_uri), f"{key}.uri")
                    if m else asyncio.sleep(0) for key, m in (("model", target.model), ("ranker", target.ranker))))
                live = self.live
                if live is not None and (source.uri, ranker and ranker.uri) == (
                        live.source.uri, live.ranker_source and live.ranker_source.uri):
                    # e.g. the config went back to the versions still live; degraded stays (a replica still cannot
                    # load them, as far as this ingress knows) until the next switch
                    if self.status.state not in ("live", "degraded"):
                        self.status = self.status.model_copy(update={"state": "live", "target": name,
                                                                     "error": None, "at": time.time()})
                    return
                self.status = self.status.model_copy(update={"state": "loading", "target": name})
                self._swap(await self._load(source, ranker), name)
            except Exception as err:  # noqa: BLE001 - whatever broke the load, the live version stays
                self._failed(name, err)
                if self.live is None:
                    await self._load_last_good()

    async def _load(self, source: ModelSource, ranker: ModelSource | None = None) -> Live:
        def read_catalog(model: ModelSource) -> Catalog:
            with fetched(model) as folder:
                return Catalog(folder)

        catalog = await asyncio.to_thread(read_catalog, source)
        ranker_catalog = None
        if ranker is not None:
            ranker_catalog = await asyncio.to_thread(read_catalog, ranker)
            check_same_catalog(catalog, ranker_catalog, ranker.uri)
        prepared = absolute_location(self.cfg.store.sequences or catalog.experiment.data.output_dir)
        old = self.live
        if old is not None and old.prepared == prepared:
            store = old.store
        else:
            store = await asyncio.to_thread(open_history_store, self.cfg.store, prepared, self.events_db)
        counts = store.item_counts()
        counts = np.pad(counts, (0, max(0, catalog.num_items + 1 - len(counts))))
        counts[0] = 0  # padding
        live = Live(source, catalog, prepared, store, counts,
                    np.argsort(-counts, kind="stable")[: int((counts > 0).sum())], tasks=[],
                    ranker_source=ranker, ranker_catalog=ranker_catalog)
        # the weights, loaded by one replica of each model deployment (the others load on first use)
        ranked, _ = await asyncio.gather(self.ranking.prepare.remote(live.ranker_ref),
                                         self.retrieval.prepare.remote(live.ref))
        live.tasks = ranked["tasks"]
        return live

    def _swap(self, live: Live, target: str) -> None:
        previous = self.live.versions if self.live is not None else None
        self.previous, self.live = self.live, live
        self.status = s.Rollout(state="live", target=target, version=live.versions, previous=previous,
                                at=time.time())
        log.warning("serving %s version %s (was %s)", live.source.name, live.versions, previous)
        self.last_good.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.last_good.with_name(f"{self.last_good.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"model": asdict(live.source),
                                   "ranker": asdict(live.ranker_source) if live.ranker_source else None}))
        tmp.replace(self.last_good)  # atomic: another replica never reads half a file

    async def _load_last_good(self) -> None:
        """A replica started after a failed rollout: serve the version that last went live, the failure
        still reported (state failed)."""
        failed = self.status
        try:
            saved = json.loads(self.last_good.read_text())
            source = ModelSource(**saved["model"])
            ranker = ModelSource(**saved["ranker"]) if saved.get("ranker") else None
        except (OSError, ValueError, TypeError, KeyError):
            return  # no version ever went live here (or a file of an older genrec: nothing to fall back to)
        try:
            self._swap(await self._load(source, ranker), failed.target)
        except Exception as err:  # noqa: BLE001
            log.error("the last live model (%s, %s) does not load either: %r", source.uri, self.last_good, err)
            return
        self.status = self.status.model_copy(update={"state": "failed", "error": failed.error})

    def _failed(self, target: str, err: Exception) -> None:
        err = getattr(err, "cause", None) or err  # a model replica's error arrives wrapped in a RayTaskError
        error = f"{type(err).__name__}: {err}"[:1000]
        serving = self.live.versions if self.live is not None else None
        if (self.status.state, self.status.error) != ("failed", error):  # the watcher retries: log once
            log.error("rollout of %s failed, %s: %s", target, f"still serving version {serving}" if serving
                      else "nothing live yet (trying the last version that went live, if any)", error)
        self.status = self.status.model_copy(update={"state": "failed", "target": target, "error": error,
                                                     "version": serving, "at": time.time()})

    async def answer(self, handler, body, response):
        """handler(live, body, response) with the live version. The model replicas that did not load it during
        the rollout load it at their first request for it; if that load fails (the artifact gone or unreadable
        since), the request is answered once more, whole, by the version served before (its catalog, its
        weights, its name in the answer), and the failure is logged and reported (state degraded).
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
        error = (f"a model replica could not load version {live.versions} (the requests it got are answered "
                 f"by version {fallback.versions}): {error}")[:1000]
        if self.status.error != error:
            log.error("%s", error)
        update = {"fallbacks": self.status.fallbacks + 1, "error": error}
        if self.status.state != "degraded":
            update |= {"state": "degraded", "at": time.time()}
        self.status = self.status.model_copy(update=update)
