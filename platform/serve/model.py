"""The served model: where it comes from (a folder, local or in object storage, or the MLflow
registry), what it knows about the catalog, and how it scores.

`resolve_model` pins a URI to one concrete version once, when the app starts (an
alias could move between two replicas' loads); every replica then loads that same
version, and every response names it.

Scoring, per user:
- the user vector is the model's L2-normalised output at the last history token
  (the last item for the items-only encoders HSTU and SASRec, the last action for
  a generative recommender, model.kind gr), with target time = the request time;
- retrieval: inner product with every item (exact), or an ANN index (genrec.serve.index),
  the history excluded, top k;
- ranking, items-only: one task, "retrieval", the same inner product per candidate;
  gr: each task's prediction (a probability, or a value for regression tasks), the
  candidates scored by M-FALCON after the interleaved history at the request time.
For HSTU stacks the history comes from M-FALCON's cache (genrec.model.mfalcon): it is
encoded once per (user, history version); appended events extend the cached keys and
values instead of re-encoding; only the last token runs per request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ..artifact import CONFIG, is_stored_folder, load_model_folder, model_folder, stored_model
from ..config import ExperimentConfig, ServeRetrievalConfig, resolve_path
from ..data.batches import context_offsets
from ..data.layout import interleave
from ..data.prepared import MANIFEST, VOCAB
from ..model import HSTU, SequentialEncoder, mfalcon
from ..model.generative import GenerativeRecommender
from ..storage import is_uri
from .cache import UserCache
from .index import build_index

RETRIEVAL_TASK = "retrieval"


class ModelLoadError(RuntimeError):
    """A model replica could not load the version a request names (artifact missing or unreadable, weights
    that do not fit, ...). Its own class so that the ingress can tell it from a scoring error and answer with
    the version served before (genrec.serve.rollout)."""


@dataclass
class ModelSource:
    """A model pinned to one version: where to load it from and what to say about it."""

    uri: str  # a folder (a local path or an object-store URI) or a concrete MLflow URI (never an alias)
    name: str
    version: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str | None = None


def resolve_model(uri: str, tracking_uri: str | None = None, key: str = "model.uri") -> ModelSource:
    """A folder (local, or in object storage: s3://bucket/prefix/model), models:/name/version,
    models:/name@alias, models:/name/latest or runs:/... -> ModelSource. `key` names the setting in errors."""
    if is_stored_folder(uri):
        folder = stored_model(uri, key)  # checked here: a missing bucket or folder fails the rollout in one line
        return ModelSource(folder.uri, folder.name, "folder", tracking_uri=tracking_uri)
    if Path(uri).is_dir():
        folder = Path(uri).resolve()
        return ModelSource(str(folder), folder.name, "folder", tracking_uri=tracking_uri)
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri or mlflow.get_tracking_uri())
    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = ref.partition("/")
            if version in ("", "latest"):
                found = client.search_model_versions(f"name='{name}'")
                if not found:
                    raise FileNotFoundError(f"no versions of registered model {name!r}")
                version = str(max(int(v.version) for v in found))
            mv = client.get_model_version(name, version)
        run_id = mv.run_id
        source = ModelSource(f"models:/{mv.name}/{mv.version}", mv.name, str(mv.version), run_id,
                             tracking_uri=tracking_uri)
    elif uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        source = ModelSource(uri, uri, run_id, run_id, tracking_uri=tracking_uri)
    else:
        raise FileNotFoundError(f"{key}={uri!r} is neither a model folder (a local path or an object-store URI) "
                                "nor an MLflow models:/ or runs:/ URI")
    if source.run_id:
        source.metrics = {k: float(v) for k, v in client.get_run(source.run_id).data.metrics.items()}
    return source


@dataclass
class ModelCall:
    """What the ingress asks a model replica for one request: the user's last N events (dense ids, oldest
    first), the version that must score them, and what the deployment needs besides (Retrieval: k and the
    items to exclude; Ranking: the candidates)."""

    user: str | None  # the store's key of a stored user (the replica caches its encoded history); None for a
    # history given in the request, which is encoded afresh
    version: int  # events the user ever had: (user, version) names the history exactly
    request_time: int
    items: np.ndarray
    actions: np.ndarray
    timestamps: np.ndarray
    context: tuple[int, ...]
    seen: np.ndarray  # every item of the history, not only the last N: what retrieval excludes
    k: int = 0
    exclude_history: bool = False
    candidates: np.ndarray | None = None
    model: ModelSource | None = None  # the pinned version the ingress names (without its run's metrics: this
    # travels with every request); None for a Scorer called directly


def absolute_tracking_uri(uri: str | None) -> str:
    """The replicas run elsewhere (another working directory, maybe another node): pin the tracking
    URI the caller means. Default $MLFLOW_TRACKING_URI, else outputs/mlflow.db as training writes it."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///outputs/mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{resolve_path(uri.removeprefix('sqlite:///'))}"
    return uri


def absolute_location(path: str) -> str:
    """A storage setting as every process means it: a local path made absolute here (the replicas run in
    another working directory, maybe on another node), an object-store URI as it is."""
    return path if is_uri(path) else str(resolve_path(path))


@contextmanager
def fetched(source: ModelSource) -> Iterator[Path]:
    """A local folder holding the model while the block runs (genrec.artifact.model_folder): a folder in object
    storage or an MLflow URI is downloaded to a temporary folder that is removed afterwards. Scorer and Catalog
    read all they need up front."""
    with model_folder(source.uri, source.tracking_uri) as folder:
        yield folder


class ItemIds:
    """Raw item id <-> dense id, in arrays rather than Python dicts (a dict of a 4M-item catalog's ids took
    most of a GiB in every ingress replica): raw ids are keyed as text (7 and "7" alike), found by a binary
    search of their sorted UTF-8 bytes."""

    def __init__(self, index: np.ndarray, raw: pa.ChunkedArray, num_items: int) -> None:
        by_dense, known = np.zeros(num_items + 1, dtype=np.int64), np.zeros(num_items + 1, dtype=bool)
        by_dense[index], known[index] = np.arange(len(index)), True
        self._raw = raw.take(pa.array(by_dense[1:], mask=~known[1:]))  # dense id d's raw id at d - 1
        text = np.array([str(r).encode() for r in raw.to_pylist()], dtype=bytes)
        order = np.argsort(text, kind="stable")
        self._keys, self._dense = text[order], index[order]

    def dense(self, raw) -> int | None:
        """A raw id (any type: keyed as text) -> its dense id, or None for an item the model does not know."""
        key = str(raw).encode()
        at = int(np.searchsorted(self._keys, key))
        return int(self._dense[at]) if at < len(self._keys) and self._keys[at] == key else None

    def raw(self, dense: int):
        return self._raw[dense - 1].as_py() if 0 < dense <= len(self._raw) else None

    def __eq__(self, other) -> bool:
        return isinstance(other, ItemIds) and np.array_equal(self._keys, other._keys) and \
            np.array_equal(self._dense, other._dense)


class Catalog:
    """What the ingress needs of a model folder, without its weights: raw <-> dense item
    ids, item metadata, the action vocabulary, the model's N, the training data's folder."""

    def __init__(self, folder: Path) -> None:
        manifest = json.loads((folder / MANIFEST).read_text())
        cfg = ExperimentConfig.model_validate_json((folder / CONFIG).read_text())
        self.experiment = cfg
        self.actions: list[str] = list(manifest.get("actions") or ["interact"])
        self.bitmask = manifest.get("action_encoding") == "bitmask"
        self.num_items = int(manifest["num_items"])
        self.kept_items = cfg.kept_items
        items = pq.read_table(folder / VOCAB / "items.parquet")
        index = items["index"].to_numpy().astype(np.int64)
        self.ids = ItemIds(index, items["item_id"], self.num_items)
        self.titles = dict(zip(index.tolist(), items["title"].to_pylist())) if "title" in items.column_names else {}
        self.genres = dict(zip(index.tolist(), items["genres"].to_pylist())) if "genres" in items.column_names else {}

    def action_id(self, name: str | None) -> int | None:
        """An action name -> the id the data uses (a one-bit mask under bitmask encoding); None if unknown."""
        if name is None:
            name = self.actions[0]
        if name not in self.actions:
            return None
        k = self.actions.index(name)
        return 1 << k if self.bitmask else k

    def action_name(self, action: int) -> str:
        if self.bitmask:
            return "+".join(a for k, a in enumerate(self.actions) if action >> k & 1) or str(action)
        return self.actions[action] if 0 <= action < len(self.actions) else str(action)

    def item(self, dense: int) -> dict:
        return {"item_id": self.ids.raw(dense), "title": self.titles.get(dense), "genres": self.genres.get(dense)}


def serving_device(setting: str) -> str:
    """ServeConfig.device -> the torch device a model replica scores on."""
    available = torch.cuda.is_available()
    if setting == "cuda" and not available:
        raise ModelLoadError("device: cuda, but this model replica sees no GPU (torch.cuda.is_available() is "
                             "False): give the Retrieval and Ranking deployments ray_actor_options num_gpus: 1, "
                             "or set device: auto")
    return "cuda" if setting == "cuda" or setting == "auto" and available else "cpu"


class Scorer:
    """Scores with a loaded model (see the module doc). Not thread-safe by itself: a replica
    calls it from one thread at a time. Requests are ModelCalls."""

    def __init__(self, folder: Path, cache_bytes: int, microbatch: int,
                 retrieval: ServeRetrievalConfig | None = None, device: str = "cpu") -> None:
        """retrieval: which index retrieve() searches (default exact); device: where the model scores
        (serving_device resolves the config's auto)."""
        self.model, cfg = load_model_folder(folder)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.kind = cfg.model.kind
        self.kept_items = cfg.kept_items
        self.microbatch = microbatch
        self.generative = isinstance(self.model, GenerativeRecommender)
        if self.generative:
            manifest = json.loads((folder / MANIFEST).read_text())
            columns = list(manifest.get("context_features") or {})
            self.context_shifts = np.asarray(context_offsets(manifest, columns), dtype=np.int64)
            self.tasks = list(self.model.task_names)
        elif isinstance(self.model, SequentialEncoder):
            self.tasks = [RETRIEVAL_TASK]
        else:
            raise ValueError(f"model.kind {self.kind!r} cannot be served: it has no retrieval output "
                             "(serve hstu, sasrec or gr)")
        with torch.no_grad():
            self.items = self.model.all_item_embeddings()
        self.index = build_index(self.items, retrieval or ServeRetrievalConfig())
        blocks = self.model.blocks
        self.cache = (UserCache(cache_bytes)
                      if isinstance(blocks, HSTU) and getattr(blocks, "is_paper_hstu", True) else None)
        if self.generative and self.cache is None:
            raise ValueError("serving a gr model needs the paper's HSTU (M-FALCON): model.attention 'pointwise' "
                             "and model.relative_bias 'both'")

    # ------------------------------------------------------------------ histories

    def _inputs(self, r: ModelCall) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack's layer-0 inputs for the request's history: x [L, D], timestamps [L]."""
        items, stamps = (torch.tensor(a, device=self.device) for a in (r.items, r.timestamps))
        if not self.generative:
            return self.model.embedding(items, torch.tensor([0, len(items)], device=self.device)), stamps
        # the interleaved layout (genrec.data.layout) without a trailing item: the candidates come after it
        context = np.asarray(r.context or [0] * len(self.context_shifts), dtype=np.int64)
        tokens = interleave((context + self.context_shifts)[None], np.asarray(r.items), np.asarray(r.actions),
                            np.asarray(r.timestamps), np.array([len(r.items)]))
        return self.model.history_inputs({"item_ids": torch.from_numpy(tokens.ids).to(self.device),
                                          "token_types": torch.from_numpy(tokens.token_types).to(self.device),
                                          "timestamps": torch.from_numpy(tokens.timestamps).to(self.device)})

    def _history_cache(self, r: ModelCall) -> tuple[mfalcon.HistoryCache, str]:
        """The user's cached history: a hit, the newest cached version extended by the
        events since, or encoded afresh. A history longer than N slides its window (all
        positions move): only histories that still start at event 0 can be extended."""
        user, version = r.user, r.version
        if user is None:
            return mfalcon.encode_history(self.model.blocks, *self._inputs(r)), "none"
        hit = self.cache.get(user, version)
        if hit is not None:
            return hit, "hit"
        latest = self.cache.latest(user)
        x, ts = self._inputs(r)
        if latest is not None and latest[0] < version <= self.kept_items:
            old = latest[1].length  # tokens cached; the new events' tokens follow at the same positions
            cache = mfalcon.extend_history(self.model.blocks, latest[1], x[old:], ts[old:])
            state = "extended"
        else:
            cache, state = mfalcon.encode_history(self.model.blocks, x, ts), "miss"
        self.cache.put(user, version, cache)
        return cache, state

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def user_vectors(self, requests: list[ModelCall]) -> tuple[torch.Tensor, list[str], list]:
        """[B, D] L2-normalised user vectors, what the cache did, and the caches (None without M-FALCON)."""
        if self.cache is None:
            return self._forward(requests), ["none"] * len(requests), [None] * len(requests)
        vectors, states, caches = [], [], []
        for r in requests:
            cache, state = self._history_cache(r)
            vectors.append(mfalcon.last_hidden(self.model.blocks, cache, r.request_time))
            states.append(state)
            caches.append(cache)
        return F.normalize(torch.stack(vectors), dim=-1, eps=1e-6), states, caches

    def _forward(self, requests: list[ModelCall]) -> torch.Tensor:
        """One jagged pass for the whole batch (items-only encoders without M-FALCON, e.g. SASRec)."""
        lengths = [len(r.items) for r in requests]
        on = dict(device=self.device, dtype=torch.long)
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), **on)
        items = torch.tensor(np.concatenate([r.items for r in requests]), **on)
        stamps = [r.timestamps for r in requests]
        ts = torch.tensor(np.concatenate(stamps), **on)
        target = torch.tensor(np.concatenate([np.append(s[1:], r.request_time) for s, r in zip(stamps, requests)]),
                              **on)
        return self.model(items, ts, target, offsets)[offsets[1:] - 1]

    @torch.no_grad()
    def retrieve(self, requests: list[ModelCall]) -> list[dict]:
        """+ seen (all history items), k, exclude_history -> top k by inner product over the item table."""
        users, states, _ = self.user_vectors(requests)
        found = self.index.search(users, max(r.k for r in requests),
                                  [r.seen if r.exclude_history else None for r in requests])
        return [{"items": items[:r.k], "scores": scores[:r.k], "cache": state}
                for (items, scores), r, state in zip(found, requests, states)]

    @torch.no_grad()
    def rank(self, requests: list[ModelCall]) -> list[dict]:
        """+ candidates [m] -> scores [m, tasks]: items-only, the user vector . the candidate's;
        gr, each task's prediction by M-FALCON (each candidate sees the history and itself)."""
        users, states, caches = self.user_vectors(requests)
        out = []
        for u, r, state, cache in zip(users, requests, states, caches):
            candidates = torch.tensor(r.candidates, device=self.device)
            if self.generative:
                x = self.model.candidate_embeddings(candidates, cache.length)
                hidden = mfalcon.candidate_hidden(self.model.blocks, cache, x, r.request_time, self.microbatch)
                scores = self.model.predictions(self.model.task_logits(hidden))
            else:
                scores = (self.items[candidates] @ u).unsqueeze(1)
            out.append({"scores": scores.tolist(), "cache": state})
        return out
