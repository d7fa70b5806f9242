"""An HTTP client for the genrec API that resends what a lost replica failed, and only what is safe to repeat.

Why the client: Ray Serve's HTTP proxy re-routes a request only while no replica has accepted it (a replica
that rejected it or could not be reached); a request that an Ingress replica accepted and was working on when
its process died is answered 500 by the proxy, and Serve (2.60) has no setting to replay it: the body was
streamed to the dead replica (ray/serve/_private/proxy.py, send_request_to_replica; router.py retries only
before acceptance). A model replica's death is the ingress's to retry (answers.MODEL_CALL_ATTEMPTS); an Ingress
replica's death is the client's. Every genrec endpoint is safe to repeat: the GETs and the POST reads
(/v1/retrieve, /v1/rank, /v1/recommend) change nothing, and /v1/events stores an event once by its identity
(its event_id, else item, action and timestamp), so a /v1/events request is resent only when each of its
events has an event_id or a timestamp (without either, the server stamps it and a resend would store it again).

    with connect("http://127.0.0.1:8000", token=...) as client:    # connect: this module's    # connect_async: an httpx.AsyncClient
        response = client.post("/v1/recommend", json={"user_id": "3", "k": 10})
        response.extensions["genrec_retries"]                      # how many times it was resent

Resent (RetryPolicy.attempts in all, waits growing from first_wait_s, random, at most max_wait_s or the
answer's Retry-After): a 500, 502, 503 or 504 answer (the app never answers 500 itself: bad input is a 4xx;
503: no replica or history store could answer, or Serve's backpressure) and a connection that failed or closed
without an answer. Never resent: a 4xx, a 408 (Serve's request_timeout_s: slow, not lost; a resend doubles the
load), a read timeout. Stdlib and httpx only: usable without the rest of genrec.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

RESENT_STATUSES = frozenset({500, 502, 503, 504})
# the request never got an answer and the connection says so (not a timeout: the server may still be working)
RESENT_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)
READ_ONLY_POSTS = ("/v1/retrieve", "/v1/rank", "/v1/recommend")
RETRIES_KEY = "genrec_retries"  # response.extensions[RETRIES_KEY]: how many times the request was resent


def safe_to_repeat(request: httpx.Request) -> bool:
    """Whether sending the request again changes nothing the first one did not (see the module docstring)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return True
    path = request.url.path
    if request.method != "POST":
        return False
    if path.endswith(READ_ONLY_POSTS):
        return True
    if not path.endswith("/v1/events"):
        return False
    try:
        events = json.loads(request.content)["events"]
        return all(e.get("event_id") or e.get("timestamp") is not None for e in events)
    except (ValueError, TypeError, KeyError, AttributeError):
        return False  # not a valid body: its 4xx is the answer


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4          # sends in all, the first included
    first_wait_s: float = 0.1  # the longest wait before the first resend; doubles for each next one
    max_wait_s: float = 2.0

    def __post_init__(self):
        if self.attempts < 1 or self.first_wait_s < 0 or self.max_wait_s < self.first_wait_s:
            raise ValueError(f"RetryPolicy: need attempts >= 1 and 0 <= first_wait_s <= max_wait_s, got {self}")

    def wait_s(self, request: httpx.Request, sent: int, response: httpx.Response | None = None,
               error: Exception | None = None) -> float | None:
        """Seconds to wait before sending again, after `sent` sends ended in `response` or `error`;
        None: do not send again (the answer stands, or the error is raised)."""
        failed = isinstance(error, RESENT_ERRORS) or (response is not None and response.status_code in RESENT_STATUSES)
        if not failed or sent >= self.attempts or not safe_to_repeat(request):
            return None
        # full jitter: clients that lost their requests together do not come back together
        wait = random.uniform(0, min(self.max_wait_s, self.first_wait_s * 2 ** (sent - 1)))
        retry_after = response.headers.get("retry-after", "") if response is not None else ""
        if retry_after.isdigit():
            wait = max(wait, min(float(retry_after), self.max_wait_s))
        return wait


def _answered(response: httpx.Response, sent: int) -> httpx.Response:
    response.extensions[RETRIES_KEY] = sent - 1
    return response


class RetryingTransport(httpx.BaseTransport):
    """httpx's transport, resending as the policy says (httpx.Client(transport=RetryingTransport()))."""

    def __init__(self, policy: RetryPolicy = RetryPolicy(), **transport_options) -> None:
        self.policy, self.inner = policy, httpx.HTTPTransport(**transport_options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body, kept to be sent again
        sent = 0
        while True:
            sent += 1
            try:
                response = self.inner.handle_request(request)
            except RESENT_ERRORS as err:
                if (wait := self.policy.wait_s(request, sent, error=err)) is None:
                    raise
            else:
                if (wait := self.policy.wait_s(request, sent, response=response)) is None:
                    return _answered(response, sent)
                response.close()
            time.sleep(wait)

    def close(self) -> None:
        self.inner.close()


class AsyncRetryingTransport(httpx.AsyncBaseTransport):
    """RetryingTransport for httpx.AsyncClient."""

    def __init__(self, policy: RetryPolicy = RetryPolicy(), **transport_options) -> None:
        self.policy, self.inner = policy, httpx.AsyncHTTPTransport(**transport_options)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        sent = 0
        while True:
            sent += 1
            try:
                response = await self.inner.handle_async_request(request)
            except RESENT_ERRORS as err:
                if (wait := self.policy.wait_s(request, sent, error=err)) is None:
                    raise
            else:
                if (wait := self.policy.wait_s(request, sent, response=response)) is None:
                    return _answered(response, sent)
                await response.aclose()
            await asyncio.sleep(wait)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _client_options(base_url: str, token: str | None, timeout_s: float) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return {"base_url": base_url, "headers": headers, "timeout": timeout_s}


def connect(base_url: str, token: str | None = None, policy: RetryPolicy = RetryPolicy(), timeout_s: float = 60,
            max_connections: int = 100) -> httpx.Client:
    """An httpx.Client for the genrec API at base_url that resends as `policy` says; `token`: for /v1/events;
    `timeout_s`: for each send."""
    transport = RetryingTransport(policy, limits=httpx.Limits(max_connections=max_connections))
    return httpx.Client(transport=transport, **_client_options(base_url, token, timeout_s))


def connect_async(base_url: str, token: str | None = None, policy: RetryPolicy = RetryPolicy(),
                  timeout_s: float = 60, max_connections: int = 100) -> httpx.AsyncClient:
    """connect, as an httpx.AsyncClient."""
    transport = AsyncRetryingTransport(policy, limits=httpx.Limits(max_connections=max_connections))
    return httpx.AsyncClient(transport=transport, **_client_options(base_url, token, timeout_s))
