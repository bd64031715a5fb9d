"""The REST API of docs/generic-esp.md over aiohttp: bearer auth, JSON errors, imports, sends, stats."""

from __future__ import annotations

import hmac
import logging
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from sandbox.engine import Account, EspError
from sandbox.protocol import API_PREFIX, EXTERNAL_ID_RE

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class ApiContext:
    """What the handlers need: the accounts by name and the expected bearer token."""

    def __init__(self, accounts: dict[str, Account], token: bytes) -> None:
        self.accounts = accounts
        self.token = token


CONTEXT = web.AppKey("context", ApiContext)


class ImportRequest(BaseModel):
    """The body of ``POST /imports``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    file: str = Field(min_length=1)
    list_name: str | None = None
    external_id: str = Field(pattern=EXTERNAL_ID_RE.pattern)


class SendRequest(BaseModel):
    """The body of ``POST /sends``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    import_id: str = Field(min_length=1)
    message: str = Field(min_length=1)
    external_id: str = Field(pattern=EXTERNAL_ID_RE.pattern)
    send_at: AwareDatetime | None = None


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = _json({"error": code, "message": message}, status)
    if headers:
        response.headers.update(headers)
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers the protocol's ``{"error", "message"}`` body, aiohttp's own ones too."""
    try:
        return await handler(request)
    except EspError as exc:
        return _error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return _error(exc.status, code, exc.reason)
    except Exception:
        log.exception("request failed", extra={"method": request.method, "path": request.path})
        return _error(500, "internal_error", "the sandbox failed on this request; see its log")


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API answers only a request with the right bearer token; the token is never logged."""
    if not request.path.startswith(API_PREFIX + "/"):
        return await handler(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return _error(401, "unauthorized", "a bearer token is required", {"WWW-Authenticate": "Bearer"})
    expected = request.app[CONTEXT].token
    if not hmac.compare_digest(given.strip().encode(), expected):
        return _error(401, "unauthorized", "the bearer token is not valid", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


def _account(request: web.Request) -> Account:
    name = request.match_info["account"]
    account = request.app[CONTEXT].accounts.get(name)
    if account is None:
        raise EspError(404, "account_not_found", f"no account {name}")
    return account


async def _body(request: web.Request, model: type[M]) -> M:
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


async def create_import(request: web.Request) -> web.Response:
    """``POST /imports``: 202 with a new import, 200 with the one this ``external_id`` made."""
    account = _account(request)
    body = await _body(request, ImportRequest)
    record, created = await account.create_import(body.file, body.list_name, body.external_id)
    if created:
        return _json({"import_id": record.import_id, "state": record.state.value}, 202)
    return _json(record.public())


async def get_import(request: web.Request) -> web.Response:
    """``GET /imports/<import_id>``."""
    account = _account(request)
    import_id = request.match_info["import_id"]
    record = account.state.imports.get(import_id)
    if record is None:
        raise EspError(404, "import_not_found", f"no import {import_id}")
    return _json(record.public())


async def create_send(request: web.Request) -> web.Response:
    """``POST /sends``: 202 with a new send, 200 with the one this ``external_id`` made (never sent again)."""
    account = _account(request)
    body = await _body(request, SendRequest)
    record, created = await account.create_send(body.import_id, body.message, body.external_id, body.send_at)
    if created:
        return _json({"send_id": record.send_id, "state": record.state.value}, 202)
    return _json(record.public())


async def get_send(request: web.Request) -> web.Response:
    """``GET /sends/<send_id>``."""
    account = _account(request)
    send_id = request.match_info["send_id"]
    record = account.state.sends.get(send_id)
    if record is None:
        raise EspError(404, "send_not_found", f"no send {send_id}")
    return _json(record.public())


async def list_sends(request: web.Request) -> web.Response:
    """``GET /sends?external_id=…``: the sends made with that ``external_id`` (all without it)."""
    account = _account(request)
    external_id = request.query.get("external_id")
    if external_id is None:
        found = list(account.state.sends.values())
    else:
        found = account.state.sends_by_external_id(external_id)
    return _json({"sends": [s.public() for s in found]})


async def stats(request: web.Request) -> web.Response:
    """``GET /_sandbox/stats`` (sandbox only): imports and sends created per ``external_id``."""
    return _json(_account(request).state.stats())


async def healthz(_request: web.Request) -> web.Response:
    """Liveness for process supervisors; no authentication, no account data."""
    return _json({"status": "ok"})


def create_app(context: ApiContext) -> web.Application:
    """The aiohttp application serving the API for ``context``'s accounts."""
    app = web.Application(middlewares=[json_errors, bearer_auth])
    app[CONTEXT] = context
    base = API_PREFIX + "/{account}"
    app.router.add_post(f"{base}/imports", create_import)
    app.router.add_get(f"{base}/imports/{{import_id}}", get_import)
    app.router.add_post(f"{base}/sends", create_send)
    app.router.add_get(f"{base}/sends", list_sends)
    app.router.add_get(f"{base}/sends/{{send_id}}", get_send)
    app.router.add_get(f"{base}/_sandbox/stats", stats)
    app.router.add_get("/healthz", healthz)
    return app
