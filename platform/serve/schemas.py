"""Request and response bodies of the HTTP API, with their limits (they are in the OpenAPI schema at /docs).

Limits (exceeding one is a 4xx naming the field, never a 500):
- request body: at most MAX_BODY_BYTES (413);
- k: 1..MAX_K; candidates: 1..MAX_CANDIDATES (422);
- history in a request: at most MAX_HISTORY events (422); a history longer than the
  model's max_seq_len is truncated to its most recent max_seq_len events
  (`history_used` in the response says how many were used);
- events in one write: 1..MAX_EVENTS (422);
- ids: integers of at most MAX_INT_ID (2^53 - 1) in size, or strings of 1 to MAX_ID_CHARS
  characters (42 and "42" are the same id; a larger integer id is written as a string);
- numbers are JSON integers: never booleans, strings, fractions, NaN or Infinity (422);
- timestamps: Unix seconds in [0, MAX_TIMESTAMP]; a request_time is not before the
  history's last event (422).

Every error answer, 4xx or 5xx, has one body (ErrorBody): {"detail": [{"loc": [...],
"msg": "...", "type": "..."}]}, FastAPI's validation-error shape without the input
echoed; each route's OpenAPI responses list the statuses it answers.

Ids are the dataset's raw ids (MovieLens movie and user ids), never the model's
dense indices. Unknown item ids in `history` or `candidates` are ignored and listed
in `unknown_items` (no known candidate at all is a 422); an unknown item in an event
write is a 422 (a write is never silently dropped). An unknown user gets the cold-start
answer (popular items, `cold_start: true`, each with its `popularity` and a null
`score`), not an error.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import HTTPException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, StringConstraints
from pydantic import WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

MAX_BODY_BYTES = 256 * 1024
MAX_K = 1000
MAX_CANDIDATES = 1024
MAX_HISTORY = 10_000
MAX_EVENTS = 1000
MAX_ID_CHARS = 128
MAX_INT_ID = 2**53 - 1  # the integers every JSON reader (JavaScript's too) and the schema's float bounds keep exactly
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01, as data.timestamp_max


def json_integer(value):
    """JSON Schema's integer: an int, or a float with no fraction (3.0); never a boolean or a string ("3"),
    which pydantic's lax int would take, while its strict int refuses 3.0."""
    if isinstance(value, (bool, str)):
        raise PydanticCustomError("int_type", "Input should be a valid integer (a number, not a boolean or a string)")
    return value


Integer = Annotated[int, BeforeValidator(json_integer)]


def raw_id(value):
    """An id in a request, as the dataset writes it: an integer (never a boolean) of at most MAX_INT_ID in
    size, or a string of 1 to MAX_ID_CHARS characters (an id written as a string is the same id: 42 == "42").
    One error that says what an id is, rather than one per member of a union."""
    what = f"an id is an integer or a string of 1 to {MAX_ID_CHARS} characters"
    if isinstance(value, float) and value.is_integer():  # JSON Schema's integer: 3.0 is 3
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) <= MAX_INT_ID:
            return value
        raise PydanticCustomError("raw_id", f"an integer id is at most {MAX_INT_ID} in size: write a larger one as "
                                            "a string")
    if not isinstance(value, str):
        raise PydanticCustomError("raw_id", what + (", not a boolean" if isinstance(value, bool) else ""))
    if not 1 <= len(value) <= MAX_ID_CHARS:
        raise PydanticCustomError("raw_id", what + (": this one is empty" if not value else ": this one is longer"))
    try:  # a lone surrogate (a JSON escape like "\\ud800") is not text: nothing downstream could encode it
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("string_unicode", "an id must be valid Unicode (no lone surrogate)") from None
    return value


RawId = Annotated[int | str, PlainValidator(raw_id), WithJsonSchema({"anyOf": [
    {"type": "integer", "minimum": -MAX_INT_ID, "maximum": MAX_INT_ID},
    {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}]})]
# the bounds before the validator: after it, the JSON schema gets them as unknown keys (ge, le), not as bounds
Timestamp = Annotated[int, Field(ge=0, le=MAX_TIMESTAMP, description="Unix seconds"), BeforeValidator(json_integer)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]  # of an action or a task


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path or header, then the field's path in it")
    msg: str
    type: str = Field(description="a stable name for the kind of error (raw_id, unknown_item, unauthorized, ...)")


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer (FastAPI's validation error shape, without the input echoed)."""

    detail: list[ErrorDetail]


def api_error(status: int, loc: tuple, msg: str, kind: str, headers: dict | None = None) -> HTTPException:
    """An HTTP error whose body is an ErrorBody with one detail."""
    return HTTPException(status, [ErrorDetail(loc=list(loc), msg=msg, type=kind).model_dump()], headers=headers)


class Event(Body):
    item_id: RawId
    action: Name | None = Field(
        None, description="an action name of the dataset (GET /v1/model lists them); default its first action")
    timestamp: Timestamp | None = Field(None, description="default: the request time")
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)] | None = Field(
        None, description="/v1/events: the event's identity for its user, so that a retried write stores it once; "
        "default (item_id, action, timestamp), so give the timestamp or the event id to make a retry a no-op. "
        "Ignored in a request's history")


class UserQuery(Body):
    """Who to recommend for: a known user (history from the store), or an explicit history."""

    # exactly one of user_id and history (the schema's oneOf says so); neither may be null
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["user_id"]}, {"required": ["history"]}]})

    user_id: RawId = Field(None, description="a user whose history is in the store (unknown: the cold-start answer)")
    history: list[Event] = Field(None, max_length=MAX_HISTORY, description=(
        "oldest first; replaces the stored history; longer than the model's max_seq_len: the most recent are used"))
    request_time: Timestamp | None = Field(None, description=(
        "the time the answer is for; default now; never before the history's last event (422)"))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class RetrieveRequest(UserQuery):
    k: Integer = Field(10, ge=1, le=MAX_K)


class RankRequest(UserQuery):
    candidates: list[RawId] = Field(min_length=1, max_length=MAX_CANDIDATES)
    tasks: list[Name] | None = Field(
        None, max_length=32, description="tasks to score and combine (GET /v1/model lists them); default all")


class RecommendRequest(RetrieveRequest):
    tasks: list[Name] | None = Field(None, max_length=32)


class EventsRequest(Body):
    user_id: RawId
    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS)


class ModelRef(BaseModel):
    name: str
    version: str


class Item(BaseModel):
    item_id: int | str
    score: float | None = Field(description=(
        "the model's score: retrieval: inner product; ranking: the weighted combination of task scores; "
        "null in a cold-start answer, which no model scored (see popularity)"))
    popularity: int | None = Field(None, description=(
        "cold start only: the item's events in the history store, the order of a cold-start answer"))
    scores: dict[str, float] | None = Field(None, description="per-task scores (ranking)")
    title: str | None = None
    genres: list[str] | None = None


class Answer(BaseModel):
    model: ModelRef = Field(description="the retrieval model (which also ranks when `ranker` is null)")
    ranker: ModelRef | None = Field(None, description="the ranking model that ordered the items, when the app "
                                    "serves one beside the retrieval model (/v1/rank, /v1/recommend)")
    user_id: int | str | None = None
    items: list[Item]
    cold_start: bool = Field(False, description=(
        "no history: popular items, most popular first, with `popularity` instead of a `score`"))
    history_used: int = Field(description="history events the model saw (at most its max_seq_len)")
    unknown_items: list[int | str] = Field(default_factory=list, description="ids not in the catalog: ignored")
    cache: str = Field("none", description="M-FALCON user cache: hit, extended, miss or none")


class EventsAnswer(BaseModel):
    """The same for a retry of a write: its events are stored once."""

    user_id: int | str
    appended: int = Field(description="the write's distinct events (by identity, see event_id), all of them in "
                                      "the history now, whether this write or an earlier one stored them")
    history_length: int = Field(description="the user's history up to and including the last of these events "
                                            "(the whole history when they were just appended)")
    new_items: list[int | str] = Field(default_factory=list, description=(
        "raw ids of this write's items the model does not know yet (new items of the catalog): their events "
        "are logged for the next refresh (jobs/refresh.py), which adds the items to the model, and are not "
        "part of the history until a version that knows them"))


class HistoryEvent(BaseModel):
    item_id: int | str
    action: str
    timestamp: int
    title: str | None = None
    genres: list[str] | None = None


class HistoryAnswer(BaseModel):
    user_id: int | str
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


class RankerInfo(BaseModel):
    """The separate ranking model, when one is served beside the retrieval model."""

    name: str
    version: str
    uri: str
    run_id: str | None
    kind: str
    max_seq_len: int
    metrics: dict[str, float]


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
    ranker: RankerInfo | None = Field(None, description="the ranking model, if not this one; `tasks` are its")
