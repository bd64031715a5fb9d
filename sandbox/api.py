"""The HTTP server every flavor shares: bearer auth, JSON errors, ``/healthz``, ``_sandbox/stats``
and the ``_sandbox/contacts`` control routes.

The flavor adds its own routes (the generic flavor's imports and sends, docs/generic-esp.md);
their handlers use :func:`account_of`, :func:`read_body` (:func:`problems`), :func:`bearer_token`
and :func:`basic_credentials` from here, and answer with ``sandbox.errors`` (``json_response``, an
``ErrorStyle`` for their ESP's error bodies).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox.contacts import ContactState, Via, valid_email
from sandbox.engine import Account
from sandbox.errors import PLAIN, EspError, found, json_response
from sandbox.faults import FAULTS_REPORT, Faults, fault_middleware, install
from sandbox.limits import TokenIssuer
from sandbox.protocol import API_PREFIX

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


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers the protocol's ``{"error", "message"}`` body, aiohttp's own ones too."""
    return await PLAIN.answer(request, handler)


def bearer_token(request: web.Request) -> str:
    """The request's bearer token ("" when it has none)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """The request's HTTP Basic (user, password), or None when it has none or they do not decode."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


_OWN_AUTH: set[object] = set()


def own_auth(handler: H) -> H:
    """Mark a flavor's route handler under ``API_PREFIX`` that checks its own authentication (e.g.
    OAuth2 access tokens, or none for a token endpoint): the shared bearer check lets it through."""
    _OWN_AUTH.add(handler)
    return handler


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API (and the faults report) answers only a request with the right bearer token; the
    token is never logged."""
    shared = request.path.startswith(API_PREFIX + "/") or request.path == FAULTS_REPORT
    if not shared or request.match_info.handler in _OWN_AUTH:
        return await handler(request)
    given = bearer_token(request)
    problem = "" if given else "a bearer token is required"
    if given and not request.app[CONTEXT].token_matches(given):
        problem = "the bearer token is not valid"
    if problem:
        raise EspError(401, "unauthorized", problem, {"WWW-Authenticate": "Bearer"})
    return await handler(request)


def named_account(request: web.Request, code: str = "account_not_found") -> Account:
    """The account named in the path (``{account}``); 404 ``code`` if there is none."""
    name = request.match_info["account"]
    return found(request.app[CONTEXT].accounts.get(name), f"no account {name}", code)


def account_of(request: web.Request, code: str = "account_not_found") -> Account:
    """The account an API call names in its path (``{account}``), the call counted in its calls per
    second; 404 ``code`` if there is none."""
    account = named_account(request, code)
    account.calls.count()
    return account


def problems(exc: ValidationError) -> str:
    """A request body's validation errors in one line: ``where: what; …`` (``body`` for the whole)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors(include_input=False)
    )


async def read_body(request: web.Request, model: type[M]) -> M:
    """The JSON body validated as ``model``; 400 with the problems otherwise."""
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise EspError(400, "invalid_json", "the body is not JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EspError(400, "invalid_request", problems(exc)) from None


async def stats(request: web.Request) -> web.Response:
    """``GET /_sandbox/stats`` (every flavor, for tests; not counted as a call): imports and sends
    created per ``external_id``, and the account's API calls per second."""
    return json_response(named_account(request).stats())


@dataclass(frozen=True)
class ContactAction:
    """What a control-route action does to the contact: its new state, how, and why."""

    state: ContactState
    via: Via
    reason: str


CONTACT_ACTIONS: dict[str, ContactAction] = {
    "unsubscribe_link": ContactAction(ContactState.UNSUBSCRIBED, Via.LINK, "unsubscribe"),
    "complaint": ContactAction(ContactState.UNSUBSCRIBED, Via.COMPLAINT, "complaint"),
    "bounce_hard": ContactAction(ContactState.UNSUBSCRIBED, Via.BOUNCE, "bounce_hard"),
    "confirm": ContactAction(ContactState.SUBSCRIBED, Via.CONFIRM, "confirm"),
    "subscribe": ContactAction(ContactState.SUBSCRIBED, Via.LINK, "subscribe"),
    "remove": ContactAction(ContactState.REMOVED, Via.API, "remove"),
}
"""The ``_sandbox/contacts`` actions: what a contact does on the ESP side (its message's unsubscribe
link, a complaint, a hard bounce, a double opt-in confirmation, a sign-up form) or what someone
does in the ESP's own interface (``remove``)."""


class ContactActionRequest(BaseModel):
    """The body of ``POST …/_sandbox/contacts``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: str = Field(min_length=3, max_length=254)
    list: str = Field(min_length=1, max_length=200)
    action: Literal["unsubscribe_link", "complaint", "confirm", "subscribe", "remove", "bounce_hard"]
    job: str | None = Field(default=None, min_length=1, max_length=200)


async def contact_action(request: web.Request) -> web.Response:
    """``POST /_sandbox/contacts`` (every flavor, for tests and the demo; not counted as a call): a
    change made on the ESP side, reported by the flavor (``Flavor.on_contact_event``); 200 with the
    record. 400 for a malformed address, or without the ``job`` the flavor needs for this action;
    404 ``send_not_found`` for a ``job`` that names no send (by its external id or send id); 409
    ``contact_not_pending`` for a confirmation of a contact that is not pending."""
    account = named_account(request)
    body = await read_body(request, ContactActionRequest)
    if not valid_email(body.email):
        raise EspError(400, "invalid_email", f"{body.email!r} is not a valid email address")
    flavor = account.flavor
    if body.job is None and body.action in flavor.job_required_for:
        raise EspError(
            400,
            "job_required",
            f"the {flavor.name} ESP reports {body.action} in a broadcast's responses: name its job",
        )
    if body.job is not None and account.send_of_job(body.job) is None:
        raise EspError(404, "send_not_found", f"no send {body.job}")
    action = CONTACT_ACTIONS[body.action]
    if body.action == "confirm":
        current = account.contacts.get(body.list, body.email)
        if current is None or current.state is not ContactState.PENDING:
            state = current.state.value if current is not None else "not on the list"
            raise EspError(
                409, "contact_not_pending", f"{body.email} is {state}, not pending, on {body.list}"
            )
    event = account.contacts.set(
        body.list, body.email, action.state, reason=action.reason, via=action.via, job=body.job
    )
    await account.report_contact_event(event)
    return json_response(event.record.public())


async def contact_records(request: web.Request) -> web.Response:
    """``GET /_sandbox/contacts?email=&list=`` (every flavor; not counted as a call): the records of
    that email and/or list (all without either), as ``{"contacts": [...]}``."""
    account = named_account(request)
    email = request.query.get("email") or None
    list_id = request.query.get("list") or None
    return json_response({"contacts": [r.public() for r in account.contacts.records(list_id, email)]})


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
    install(app, faults)
    app.add_routes(routes)
    app.router.add_get(API_PREFIX + "/{account}/_sandbox/stats", stats)
    app.router.add_post(API_PREFIX + "/{account}/_sandbox/contacts", contact_action)
    app.router.add_get(API_PREFIX + "/{account}/_sandbox/contacts", contact_records)
    app.router.add_get("/healthz", healthz)
    return app
