"""Request and response bodies of the HTTP API, with their limits (they are in the OpenAPI schema at /docs).

Limits (exceeding one is a 4xx naming the field, never a 500):
- request body: at most MAX_BODY_BYTES (413);
- k: 1..MAX_K; candidates: 1..MAX_CANDIDATES (422);
- history in a request: at most MAX_HISTORY events (422); a history longer than the
  model's max_seq_len is truncated to its most recent max_seq_len events
  (`history_used` in the response says how many were used);
- events in one write: 1..MAX_EVENTS (422); ids: integers or strings of at most MAX_ID_CHARS;
- timestamps: Unix seconds in [0, MAX_TIMESTAMP].

Ids are the dataset's raw ids (MovieLens movie and user ids), never the model's
dense indices. Unknown item ids in `history` or `candidates` are ignored and listed
in `unknown_items`; an unknown item in an event write is a 422 (a write is never
silently dropped). An unknown user gets the cold-start answer (popular items,
`cold_start: true`), not an error.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_BODY_BYTES = 256 * 1024
MAX_K = 1000
MAX_CANDIDATES = 1024
MAX_HISTORY = 10_000
MAX_EVENTS = 1000
MAX_ID_CHARS = 128
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01, as data.timestamp_max

RawId = Union[Annotated[int, Field(ge=-(2**63), le=2**63 - 1)],
              Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]]
Timestamp = Annotated[int, Field(ge=0, le=MAX_TIMESTAMP, description="Unix seconds")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Event(Body):
    item_id: RawId
    action: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        None, description="an action name of the dataset (GET /v1/model lists them); default its first action")
    timestamp: Timestamp | None = Field(None, description="default: the request time")


class UserQuery(Body):
    """Who to recommend for: a known user (history from the store), or an explicit history."""

    user_id: RawId | None = None
    history: list[Event] | None = Field(None, max_length=MAX_HISTORY, description=(
        "oldest first; replaces the stored history; longer than the model's max_seq_len: the most recent are used"))
    request_time: Timestamp | None = Field(None, description="the time the answer is for; default now")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class RetrieveRequest(UserQuery):
    k: int = Field(10, ge=1, le=MAX_K)


class RankRequest(UserQuery):
    candidates: list[RawId] = Field(min_length=1, max_length=MAX_CANDIDATES)
    tasks: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        None, max_length=32, description="tasks to score and combine (GET /v1/model lists them); default all")


class RecommendRequest(RetrieveRequest):
    tasks: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(None, max_length=32)


class EventsRequest(Body):
    user_id: RawId
    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS)


class ModelRef(BaseModel):
    name: str
    version: str


class Item(BaseModel):
    item_id: RawId
    score: float = Field(description="retrieval: inner product; ranking: the weighted combination of task scores")
    scores: dict[str, float] | None = Field(None, description="per-task scores (ranking)")
    title: str | None = None
    genres: list[str] | None = None


class Answer(BaseModel):
    model: ModelRef
    user_id: RawId | None = None
    items: list[Item]
    cold_start: bool = Field(False, description="no history: popular items, most popular first")
    history_used: int = Field(description="history events the model saw (at most its max_seq_len)")
    unknown_items: list[RawId] = Field(default_factory=list, description="ids not in the catalog: ignored")
    cache: str = Field("none", description="M-FALCON user cache: hit, extended, miss or none")


class EventsAnswer(BaseModel):
    user_id: RawId
    appended: int
    history_length: int


class HistoryEvent(BaseModel):
    item_id: RawId
    action: str
    timestamp: int
    title: str | None = None
    genres: list[str] | None = None


class HistoryAnswer(BaseModel):
    user_id: RawId
    known: bool
    events: list[HistoryEvent] = Field(description="most recent last")


class Rollout(BaseModel):
    """The last model change this ingress replica was asked for, and how it went."""

    state: Literal["loading", "live", "failed", "degraded"] = Field(
        description="live: the target is served; loading: it is being loaded (the old version answers meanwhile); "
                    "failed: it did not load, `version` is still served; degraded: `version` went live, but a model "
                    "replica could not load it later (its first request for it), so the requests that replica got "
                    "were answered by `previous` (each answer names its version); until the next rollout")
    target: str | None = Field(None, description="the model URI asked for (an alias as written)")
    version: str | None = Field(None, description="the version served now")
    previous: str | None = Field(None, description="the version served before the last switch")
    error: str | None = Field(None, description="why the target did not load (failed), or why a replica could not "
                                                "load the live version (degraded)")
    fallbacks: int = Field(0, description="requests answered by `previous` because a model replica could not load "
                                          "`version` (since the switch)")
    at: float | None = Field(None, description="Unix time of the last change of state")


class ModelInfo(BaseModel):
    name: str
    version: str
    uri: str
    run_id: str | None
    kind: str
    tasks: list[str]
    task_weights: dict[str, float]
    actions: list[str]
    num_items: int
    max_seq_len: int
    metrics: dict[str, float]
    limits: dict[str, int]
    retrieval_index: str = Field(description="exact, or the ANN index retrieval searches (hnsw, ivf)")
    rollout: Rollout
