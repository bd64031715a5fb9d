"""Errors and how each ESP words them: handlers raise :class:`EspError`; an :class:`ErrorStyle` answers it.

Every flavor's errors go through one style: the generic protocol's ``{"error", "message"}``
(:data:`PLAIN`, also the shared middleware's), RFC 6749's token errors (:data:`OAUTH`), or a style
its module defines for its ESP's bodies (problem+json, ``{"status", "message"}``…).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)

T = TypeVar("T")


class EspError(Exception):
    """An error the API answers with ``status``, a body in its flavor's style, and ``headers``.

    ``headers`` are added to the answer (e.g. ``Retry-After`` of a 429); ``code`` is the
    machine-readable name styles that have one show (``import_not_found``).
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def bad_request(message: str) -> EspError:
    """A 400 ``bad_request``."""
    return EspError(400, "bad_request", message)


def conflict(message: str) -> EspError:
    """A 409 ``conflict``."""
    return EspError(409, "conflict", message)


def not_found(message: str, code: str = "not_found") -> EspError:
    """A 404 (``code`` for styles that show one, e.g. ``import_not_found``)."""
    return EspError(404, code, message)


def found(value: T | None, message: str, code: str = "not_found") -> T:
    """``value``; the 404 ``code`` with ``message`` when it is None (an unknown id in a request)."""
    if value is None:
        raise not_found(message, code)
    return value


def json_response(
    body: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
    charset: str | None = None,
) -> web.Response:
    """A JSON answer."""
    response = web.Response(body=orjson.dumps(body), status=status, content_type=content_type)
    if charset is not None:
        response.charset = charset
    response.headers.update(headers or {})
    return response


def _http_error(exc: web.HTTPException) -> EspError:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
    return EspError(exc.status, code, exc.reason)


@dataclass(frozen=True)
class ErrorStyle:
    """How one ESP words an error: the body of an :class:`EspError`, its content type and headers."""

    body: Callable[[EspError], Any]
    content_type: str = "application/json"
    charset: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    """Headers on every error answer (e.g. ``Cache-Control: no-store`` of token errors)."""

    def response(self, error: EspError) -> web.Response:
        """The answer to ``error``."""
        headers = {**self.headers, **error.headers}
        return json_response(self.body(error), error.status, headers, self.content_type, self.charset)

    async def answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The handler's answer; its errors (aiohttp's HTTP errors and failures too) in this style."""
        try:
            return await handler(request)
        except EspError as exc:
            return self.response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return self.response(_http_error(exc))
        except Exception:
            log.exception("request failed", extra={"method": request.method, "path": request.path})
            return self.response(
                EspError(500, "internal_error", "the sandbox failed on this request; see its log")
            )

    def guard(self, handler: Handler) -> Handler:
        """``handler`` answering its errors in this style (the shared middleware's style is :data:`PLAIN`)."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            return await self.answer(request, handler)

        return guarded


PLAIN = ErrorStyle(lambda e: {"error": e.code, "message": e.message})
"""``{"error": code, "message": message}``: the generic protocol's errors, and every flavor's
unless it answers in its own style."""

OAUTH = ErrorStyle(lambda e: {"error": e.code, "error_description": e.message})
"""RFC 6749 §5.2 token endpoint errors: ``{"error", "error_description"}``."""
