"""The HTTP server every flavor shares: bearer auth, JSON errors, ``/healthz``, ``_sandbox/stats``.

The flavor adds its own routes (the generic flavor's imports and sends, docs/generic-esp.md);
their handlers use :func:`account_of`, :func:`read_body` and :func:`json_response` from here.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from sandbox.engine import Account, EspError
from sandbox.faults import Faults, fault_middleware, install
from sandbox.limits import TokenIssuer
from sandbox.protocol import API_PREFIX

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
H = TypeVar("H", bound=Handler)


class ApiContext:
    """What the handlers need: the accounts by name, the expected bearer token (the sandbox's
    ``TOKEN``), and the issuer of OAuth-style access tokens (``TOKEN_TTL_S``) for flavors that
    hand them out."""

    def __init__(self, accounts: dict[str, Account], token: bytes, tokens: TokenIssuer | None = None) -> None:
        self.accounts = accounts
        self.token = token
        self.tokens = tokens if tokens is not None else TokenIssuer(3600.0)

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the sandbox's ``TOKEN`` (compared in constant time)."""
        return hmac.compare_digest(given.encode(), self.token)


CONTEXT = web.AppKey("context", ApiContext)


def json_response(body: Any, status: int = 200) -> web.Response:
    """A JSON answer."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = json_response({"error": code, "message": message}, status)
    if headers:
        response.headers.update(headers)
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers the protocol's ``{"error", "message"}`` body, aiohttp's own ones too."""
    try:
        return await handler(request)
    except EspError as exc:
        return _error(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return _error(exc.status, code, exc.reason)
    except Exception:
        log.exception("request failed", extra={"method": request.method, "path": request.path})
        return _error(500, "internal_error", "the sandbox failed on this request; see its log")


_OWN_AUTH: set[object] = set()


def own_auth(handler: H) -> H:
    """Mark a flavor's route handler under ``API_PREFIX`` that checks its own authentication (e.g.
    OAuth2 access tokens, or none for a token endpoint): the shared bearer check lets it through."""
    _OWN_AUTH.add(handler)
    return handler


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API answers only a request with the right bearer token; the token is never logged."""
    if not request.path.startswith(API_PREFIX + "/") or request.match_info.handler in _OWN_AUTH:
        return await handler(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return _error(401, "unauthorized", "a bearer token is required", {"WWW-Authenticate": "Bearer"})
    expected = request.app[CONTEXT].token
    if not hmac.compare_digest(given.strip().encode(), expected):
        return _error(401, "unauthorized", "the bearer token is not valid", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


def account_of(request: web.Request) -> Account:
    """The account named in the path (``{account}``); 404 if there is none."""
    name = request.match_info["account"]
    account = request.app[CONTEXT].accounts.get(name)
    if account is None:
        raise EspError(404, "account_not_found", f"no account {name}")
    return account


async def read_body(request: web.Request, model: type[M]) -> M:
    """The JSON body validated as ``model``; 400 with the problems otherwise."""
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise EspError(400, "invalid_json", "the body is not JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise EspError(400, "invalid_request", problems) from None


async def stats(request: web.Request) -> web.Response:
    """``GET /_sandbox/stats`` (every flavor, for tests): imports and sends created per ``external_id``."""
    return json_response(account_of(request).state.stats())


async def healthz(_request: web.Request) -> web.Response:
    """Liveness for process supervisors; no authentication, no account data."""
    return json_response({"status": "ok"})


def create_app(
    context: ApiContext,
    routes: Iterable[web.RouteDef],
    max_body_bytes: int = 64 * 1024 * 1024,
    faults: Faults | None = None,
) -> web.Application:
    """The aiohttp application for ``context``'s accounts: the flavor's ``routes`` and the shared ones.

    Request bodies above ``max_body_bytes`` are answered 413. ``faults`` break the requests their
    rules pick, before anything else looks at them (sandbox.faults).
    """
    faults = faults if faults is not None else Faults()
    app = web.Application(
        middlewares=[fault_middleware(faults), json_errors, bearer_auth], client_max_size=max_body_bytes
    )
    app[CONTEXT] = context
    install(app, faults, context.token)
    app.add_routes(routes)
    app.router.add_get(API_PREFIX + "/{account}/_sandbox/stats", stats)
    app.router.add_get("/healthz", healthz)
    return app
