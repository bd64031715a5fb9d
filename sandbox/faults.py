"""Faults on request (``FAULTS``): the sandbox answers chosen API calls with 429s, 5xx, silence or a
connection closed mid-answer, so tests can show what a client does when an ESP misbehaves.

A rule picks requests by method and path and says what goes wrong and when:

- ``fault``: ``429`` (with ``Retry-After: RETRY_AFTER_S``), ``500``, ``503``, ``timeout`` (the
  answer is held ``DELAY_S`` or until the client gives up, then a 504) or ``reset`` (the status
  line, the headers and half of the body are sent, then the connection is aborted);
- ``when``: ``before`` (instead of the handler: the ESP did nothing) or ``after`` (the handler
  runs, so the ESP did the work, e.g. created the send, and then its answer is broken);
- ``skip`` matching requests go through first, then ``times`` of them get the fault.

Every matching rule counts a request (``matched``); the first rule that is due breaks it
(``fired``). Test-support paths (``/_sandbox/…``) and ``/healthz`` never get faults.
``GET /_sandbox/faults`` (the sandbox's bearer token) answers the rules with their counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox.errors import PLAIN, EspError, json_response

log = logging.getLogger(__name__)

EXEMPT_RE = re.compile(r"(^|/)_sandbox(/|$)|^/healthz$")
"""Paths that never get faults: what tests read to check the outcome, and the liveness check."""

METHOD_RE = re.compile(r"^(\*|[A-Z]{1,20})$")


class FaultKind(StrEnum):
    """What goes wrong with a request."""

    TOO_MANY = "429"
    """``429 rate_limited`` with ``Retry-After``."""
    ERROR = "500"
    """``500 internal_error``."""
    UNAVAILABLE = "503"
    """``503 unavailable``."""
    TIMEOUT = "timeout"
    """No answer for ``delay_s`` (or until the client closes the connection), then a 504."""
    RESET = "reset"
    """Status line, headers and half of the body, then the connection is aborted."""


class When(StrEnum):
    """Whether the ESP does the request's work before its answer breaks."""

    BEFORE = "before"
    """The fault replaces the handler: nothing happened at the ESP."""
    AFTER = "after"
    """The handler runs (its work is done), then its answer is broken."""


class FaultRule(BaseModel):
    """One rule of ``ESPBRIDGE_SANDBOX_FAULTS``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(min_length=1, description="a regular expression searched in the request path")
    name: str = Field(default="", max_length=200, description="a label for the log and the report")
    fault: FaultKind
    method: str = Field(default="*", description="an HTTP method, or * for any")
    when: When = When.BEFORE
    times: int = Field(default=1, ge=1, description="how many matching requests get the fault")
    skip: int = Field(default=0, ge=0, description="matching requests let through first")
    delay_s: float = Field(default=30.0, gt=0.0, le=3600.0, description="how long a timeout holds")
    retry_after_s: int = Field(default=1, ge=0, description="the Retry-After of a 429")

    @field_validator("fault", mode="before")
    @classmethod
    def _status_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        value = value.upper()
        if not METHOD_RE.fullmatch(value):
            raise ValueError(f"method must be an HTTP method or *, not {value!r}")
        return value

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"path is not a regular expression: {exc}") from None
        return value


def parse_rules(value: Any) -> Any:
    """``FAULTS`` as given: a JSON text is parsed (a clear error if it is not JSON); a list passes."""
    if isinstance(value, bytes | str):
        text = value.strip() if isinstance(value, str) else value.decode("utf-8", "replace").strip()
        if not text:
            return ()
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc}); want a list of rules like [{{...}}]") from None
    if not isinstance(value, list | tuple):
        raise ValueError("must be a JSON list of rules")
    return value


class Faults:
    """The configured rules and how many requests each matched and broke."""

    def __init__(self, rules: Sequence[FaultRule] = ()) -> None:
        self.rules = tuple(rules)
        self._paths = tuple(re.compile(rule.path) for rule in self.rules)
        self.matched = [0] * len(self.rules)
        self.fired = [0] * len(self.rules)
        self.closing = asyncio.Event()
        """Set when the server stops: held requests give up at once."""

    def pick(self, method: str, path: str) -> int | None:
        """Count a request against every rule it matches; the index of the rule that breaks it, if any."""
        if EXEMPT_RE.search(path):
            return None
        chosen = None
        for index, rule in enumerate(self.rules):
            if rule.method not in ("*", method) or not self._paths[index].search(path):
                continue
            self.matched[index] += 1
            if chosen is None and self.matched[index] > rule.skip and self.fired[index] < rule.times:
                self.fired[index] += 1
                chosen = index
        return chosen

    def report(self) -> list[dict[str, Any]]:
        """Each rule as configured, with ``matched`` and ``fired`` so far."""
        return [
            {**rule.model_dump(mode="json"), "matched": self.matched[i], "fired": self.fired[i]}
            for i, rule in enumerate(self.rules)
        ]


FAULTS = web.AppKey("faults", Faults)


def _error(status: int, code: str, message: str) -> web.Response:
    return PLAIN.response(EspError(status, code, message))


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def _hold(request: web.Request, faults: Faults, delay_s: float) -> None:
    """Wait ``delay_s``, or less if the client hangs up or the server stops."""
    deadline = asyncio.get_running_loop().time() + delay_s
    while _connected(request) and not faults.closing.is_set():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        with contextlib.suppress(TimeoutError):  # wakes every 50 ms to check the client
            await asyncio.wait_for(faults.closing.wait(), min(left, 0.05))


async def _reset(request: web.Request, answer: web.StreamResponse | None) -> web.StreamResponse:
    """Send the answer's status, headers and half of its body, then abort the connection."""
    if isinstance(answer, web.Response) and isinstance(answer.body, bytes) and answer.body:
        status, body = answer.status, answer.body
        content_type = answer.content_type
    else:
        status, content_type = 200, "application/json"
        body = orjson.dumps({"message": "the sandbox closes this connection before the end of the body"})
    broken = web.StreamResponse(status=status, headers={"Content-Length": str(len(body))})
    broken.content_type = content_type
    await broken.prepare(request)
    await broken.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.abort()
    return broken


async def _break(
    request: web.Request, faults: Faults, rule: FaultRule, answer: web.StreamResponse | None
) -> web.StreamResponse:
    message = f"sandbox fault: {rule.fault.value} {rule.when.value} {request.method} {request.path}"
    match rule.fault:
        case FaultKind.TOO_MANY:
            response = _error(429, "rate_limited", message)
            response.headers["Retry-After"] = str(rule.retry_after_s)
            return response
        case FaultKind.ERROR:
            return _error(500, "internal_error", message)
        case FaultKind.UNAVAILABLE:
            return _error(503, "unavailable", message)
        case FaultKind.TIMEOUT:
            await _hold(request, faults, rule.delay_s)
            return answer if answer is not None else _error(504, "timeout", message)
        case FaultKind.RESET:
            return await _reset(request, answer)


def fault_middleware(faults: Faults) -> Middleware:
    """The outermost middleware: breaks the requests the rules pick, before authentication."""

    @web.middleware
    async def inject_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        index = faults.pick(request.method, request.path)
        if index is None:
            return await handler(request)
        rule = faults.rules[index]
        answer = await handler(request) if rule.when is When.AFTER else None
        log.warning(
            "fault injected",
            extra={
                "method": request.method,
                "path": request.path,
                "fault": rule.fault.value,
                "when": rule.when.value,
                "rule": index,
                "rule_name": rule.name,
                "fired": faults.fired[index],
                "times": rule.times,
                "handler_status": answer.status if answer is not None else None,
            },
        )
        return await _break(request, faults, rule, answer)

    return inject_faults


FAULTS_REPORT = "/_sandbox/faults"
"""Where the rules and their counts are served (the shared bearer check guards it)."""


async def faults_report(request: web.Request) -> web.Response:
    """``GET /_sandbox/faults`` (the sandbox's bearer token): the rules with their counts."""
    return json_response({"rules": request.app[FAULTS].report()})


def install(app: web.Application, faults: Faults) -> None:
    """Serve ``GET /_sandbox/faults`` and release held requests when the server stops.

    The middleware itself is passed to ``web.Application`` (it must be the outermost one).
    """
    app[FAULTS] = faults
    app.router.add_get(FAULTS_REPORT, faults_report)

    async def release(_app: web.Application) -> None:
        faults.closing.set()

    app.on_shutdown.append(release)
