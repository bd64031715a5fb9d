"""JSON over HTTP for connectors: the one way every connector calls its ESP.

:class:`EspClient` makes an account's calls: it adds the credentials (headers, an OAuth2 token
renewed once after a 401, or request parameters), keeps the concurrency cap and the
:class:`RateLimiter` (or the account's limiter shared by every process, :mod:`shared.esp.limits`),
waits out an earlier answer's ``Retry-After`` (or fails at once when that is
further away than the request timeout) and repeats a call as the ESP's :class:`Retries` say.
Every answer goes through :func:`request_json`'s one mapping:

* 401 and 403 are :class:`EspAuthError` (a configuration error: the credentials);
* 429 and 5xx, timeouts and dropped connections are :class:`EspUnavailableError`, transient,
  carrying the server's ``Retry-After``;
* the statuses a call expects (and 404 and 409 by default) are answered to the caller; any other
  refusal is :class:`EspRequestError`, or the connector's own error built from the ESP's body.

No error text and no log line carries a query string or a secret (:func:`redact`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, TypeGuard, TypeVar, Unpack

import aiohttp
import orjson

from shared.model.errors import ConfigurationError, PermanentError, TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")

ANSWERED = (200, 201, 202, 404, 409)
"""The statuses answered to the caller unless a call says otherwise: success, and the two a
connector reads as the ESP's "not found" and "conflict"."""

_QUERY = re.compile(r"\?[^\s'\">]*")


class EspUnavailableError(TransientError):
    """The ESP did not answer usefully now (timeout, dropped connection, 5xx, 429)."""

    def __init__(
        self, message: str, retry_after_s: float | None = None, *, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status
        """The HTTP status when the ESP answered (429, 5xx), else None."""


class EspRequestError(PermanentError):
    """The ESP refused the request as such (a 4xx other than 401, 403 and 429 the call did not expect)."""


class EspAuthError(ConfigurationError):
    """The ESP refused the credentials (401 or 403)."""


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds (negative ones as 0), None when absent or not seconds."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Text fit for an error or a log line: query strings cut (``?…``), every secret starred."""
    text = _QUERY.sub("?…", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def short_json(body: Any) -> str:
    """A parsed body, shortened for a message."""
    try:
        return orjson.dumps(body).decode("utf-8", "replace")[:300]
    except TypeError:
        return repr(body)[:300]


def is_count(value: Any) -> TypeGuard[int]:
    """Whether a JSON value is a count: an integer (not a boolean), zero or more."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


Refusal = Callable[[str, int, Any, str], Exception]
"""The error of a refused request from (``METHOD url``, status, parsed body or None, body text)."""


def refused(where: str, status: int, body: Any, text: str) -> Exception:
    """The default refusal: :class:`EspRequestError` with the ESP's answer."""
    return EspRequestError(f"{where} answered {status}: {text}")


class RequestParts(TypedDict, total=False):
    """What a request sends besides its method and URL, and what it answers to its caller."""

    params: Mapping[str, str] | None
    """The query."""
    json: Any
    """A JSON body."""
    form: Mapping[str, str] | None
    """Form fields: the body when there is no ``json``."""
    multipart: bool
    """The form as ``multipart/form-data`` (else url-encoded)."""
    answered: tuple[int, ...]
    """The statuses answered to the caller (default :data:`ANSWERED`); others are refusals."""


_NOT_JSON = object()


def _json(body: bytes) -> Any:
    """The parsed body (None when empty), or :data:`_NOT_JSON`."""
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return _NOT_JSON


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    refusal: Refusal = refused,
    secrets: Iterable[str] = (),
    follow_redirects: bool = True,
    **parts: Unpack[RequestParts],
) -> tuple[int, Any]:
    """One call; (status, parsed body) for the ``answered`` statuses, else the error of the mapping.

    The body is ``json``, or ``form`` fields: one error mapping whatever the ESP wants its bodies
    in. Error texts name the method and the URL without its query, and ``secrets`` never appear
    in them.
    """
    secrets = tuple(secrets)
    all_headers = {"Accept": "application/json", **(headers or {})}
    data: Any = None
    form = parts.get("form")
    if parts.get("json") is not None:
        data = orjson.dumps(parts.get("json"))
        all_headers["Content-Type"] = "application/json"
    elif form is not None:
        data = aiohttp.FormData(default_to_multipart=parts.get("multipart", False))
        for key, value in form.items():
            data.add_field(key, value)
    where = f"{method} {redact(url, secrets)}"
    try:
        async with session.request(
            method,
            url,
            data=data,
            params=parts.get("params"),
            headers=all_headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=follow_redirects,
        ) as resp:
            body = await resp.read()
            status = resp.status
            wait = retry_after(resp.headers.get("Retry-After"))
    except TimeoutError:  # aiohttp's timeouts are TimeoutErrors, some ClientErrors too
        raise EspUnavailableError(f"{where}: no complete answer within {timeout_s:g}s") from None
    except aiohttp.ClientError as exc:
        # from None: the original exception's text may hold the URL with its query string
        raise EspUnavailableError(f"{where}: {type(exc).__name__}: {redact(str(exc), secrets)}") from None
    said = redact(body.decode("utf-8", "replace"), secrets)  # what an error may quote of the answer
    text = said[:300]
    if status == 429 or status >= 500:
        raise EspUnavailableError(f"{where} answered {status}: {text}", wait, status=status)
    if status in (401, 403):
        raise EspAuthError(f"{where} answered {status}: the ESP refused the credentials: {text}")
    if status not in parts.get("answered", ANSWERED):
        refused_body = _json(said.encode())
        raise refusal(where, status, None if refused_body is _NOT_JSON else refused_body, text)
    parsed = _json(body)
    if parsed is _NOT_JSON:
        raise EspUnavailableError(
            f"{where} answered {status} with a body that is not JSON: {text}", status=status
        )
    return status, parsed


class Limiter(Protocol):
    """What an :class:`EspClient` waits on before each call: a :class:`RateLimiter`, or one that all
    processes share (:mod:`shared.esp.limits`)."""

    def slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Wait for a free slot; it is held while the block runs, and for the limit's window after."""
        ...


class RateLimiter:
    """At most ``calls`` calls in any ``per_s`` seconds, across all tasks of the process.

    A call holds its slot from the moment it starts until ``per_s`` after it ended (its answer
    came, or it failed): the ESP saw it somewhere in between, so however long a request spent on
    the way, the next call in that slot reaches the ESP at least ``per_s`` after it. Counting from
    the start instead lets a call that was slow to arrive (a new connection, a busy network) and
    one sent on time land in the same second at the ESP. Waiting here keeps the client under an
    ESP's documented limit, so 429s stay the exception.
    """

    def __init__(self, calls: int, per_s: float = 1.0) -> None:
        self._calls = calls
        self._per_s = per_s
        self._ended: deque[float] = deque()  # when the calls of the last per_s seconds ended
        self._open = 0  # calls started and not yet ended
        self._freed = asyncio.Event()  # replaced each time a call ends

    @property
    def taken(self) -> int:
        """Slots taken now: calls in flight and calls that ended less than ``per_s`` ago."""
        now = time.monotonic()
        return self._open + sum(1 for ended in self._ended if now - ended < self._per_s)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot, hold it while the block runs, and for ``per_s`` after it."""
        while True:
            now = time.monotonic()
            while self._ended and now - self._ended[0] >= self._per_s:
                self._ended.popleft()
            if self._open + len(self._ended) < self._calls:
                break
            freed = self._freed
            # until the oldest ended call ages out, or (all slots open) until one ends
            wait = self._per_s - (now - self._ended[0]) if self._ended else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), wait)
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1
            self._ended.append(time.monotonic())
            self._freed.set()
            self._freed = asyncio.Event()


def _no_backoff(attempt: int, error: EspUnavailableError) -> float | None:
    return None


@dataclass(frozen=True, slots=True)
class Retries:
    """When a call the ESP did not answer usefully (429, 5xx, a timeout) is made again.

    The ESP's ``Retry-After`` is the wait when it gives one, else ``backoff_s`` (None: not
    repeated). The default repeats nothing.
    """

    attempts: int | None = 1
    """Calls of one request at most; None: as many as ``total_wait_s`` allows."""
    rate_limits_only: bool = False
    """Repeat only a 429; other transient failures go to the caller at once."""
    backoff_s: Callable[[int, EspUnavailableError], float | None] = _no_backoff
    """The wait after the n-th failed call when the ESP gave no Retry-After."""
    max_wait_s: float | None = None
    """One wait at most; a longer one goes to the caller, which waits that long itself."""
    total_wait_s: float | None = None
    """The waits of one request together at most."""

    def wait(self, attempt: int, error: EspUnavailableError, waited: float) -> float | None:
        """The wait before the call after the ``attempt``-th failed with ``error``; None: no more calls."""
        if self.attempts is not None and attempt >= self.attempts:
            return None
        if self.rate_limits_only and error.status != 429:
            return None
        wait = error.retry_after_s if error.retry_after_s is not None else self.backoff_s(attempt, error)
        if wait is None or (self.max_wait_s is not None and wait > self.max_wait_s):
            return None
        if self.total_wait_s is not None and waited + wait > self.total_wait_s:
            return None
        return wait


class TokenSource(Protocol):
    """Something that produces an Authorization header value and can be told it was refused."""

    async def authorization(self) -> str:
        """The header value, fetching or refreshing the token when needed."""
        ...

    def invalidate(self) -> None:
        """The ESP refused the current token: fetch a new one next time."""
        ...


class EspClient:
    """The calls of one account to its ESP's JSON API (see the module docstring).

    ``headers`` go with every call; a ``token`` adds its ``Authorization`` (renewed and the call
    repeated once after a 401 or 403); ``auth_params`` travel in the query of a GET and in the
    form of any other call. Their values, and ``secrets``, are starred in every error text.
    ``holds``: an answer's Retry-After holds the account's later calls until it has passed.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        account: str,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        token: TokenSource | None = None,
        auth_params: Mapping[str, str] | None = None,
        secrets: Iterable[str] = (),
        limiter: Limiter | None = None,
        concurrency: int | None = None,
        retries: Retries | None = None,
        holds: bool = False,
        answered: tuple[int, ...] = ANSWERED,
        refusal: Refusal = refused,
        follow_redirects: bool = True,
    ) -> None:
        self.account = account
        self.limiter = limiter
        self.retries = retries or Retries()
        self._session = session
        self._base = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._headers = dict(headers or {})
        self._token = token
        self._auth_params = dict(auth_params or {})
        self._secrets = tuple(
            s for s in (*secrets, *self._auth_params.values(), *_header_secrets(self._headers)) if s
        )
        self._semaphore = asyncio.Semaphore(concurrency) if concurrency else None
        self._holds = holds
        self._hold_until = 0.0  # monotonic time before which an answer's Retry-After asks us not to call
        self._answered = answered
        self._refusal = refusal
        self._follow_redirects = follow_redirects

    def redact(self, text: str) -> str:
        """``text`` without query strings and without this account's secrets."""
        return redact(text, self._secrets)

    async def call(
        self, method: str, path: str, *, retries: Retries | None = None, **parts: Unpack[RequestParts]
    ) -> tuple[int, Any]:
        """:meth:`once`, repeated as ``retries`` (else the client's) allow."""
        return await self.retrying(lambda: self.once(method, path, **parts), retries)

    async def retrying(self, attempt: Callable[[], Awaitable[T]], retries: Retries | None = None) -> T:
        """``attempt()``, made again after an EspUnavailableError as ``retries`` allow."""
        retries = retries or self.retries
        number, waited = 0, 0.0
        while True:
            number += 1
            try:
                return await attempt()
            except EspUnavailableError as exc:
                if self._holds and exc.retry_after_s is not None:
                    self._hold_until = max(self._hold_until, time.monotonic() + exc.retry_after_s)
                wait = retries.wait(number, exc, waited)
                if wait is None:
                    raise
                log.info(
                    "ESP call repeated after a transient failure",
                    extra={"account": self.account, "error": str(exc), "retry_in_s": wait},
                )
                await asyncio.sleep(wait)  # the ESP's Retry-After, else its documented backoff
                waited += wait

    async def once(self, method: str, path: str, **parts: Unpack[RequestParts]) -> tuple[int, Any]:
        """One request: after the hold, with the credentials, within the concurrency cap and the rate."""
        url = self._base + path
        await self._wait_for_hold(f"{method} {self.redact(url)}")
        if self._auth_params and method == "GET":
            parts["params"] = {**(parts.get("params") or {}), **self._auth_params}
        elif self._auth_params:
            parts["form"] = {**(parts.get("form") or {}), **self._auth_params}
        if "answered" not in parts:
            parts["answered"] = self._answered
        for renewed in (False, True):
            headers = dict(self._headers)
            if self._token is not None:
                headers["Authorization"] = await self._token.authorization()
            try:
                async with (
                    self._semaphore or contextlib.nullcontext(),
                    self.limiter.slot() if self.limiter else contextlib.nullcontext(),
                ):
                    return await request_json(
                        self._session,
                        method,
                        url,
                        headers=headers,
                        timeout_s=self._timeout_s,
                        refusal=self._refusal,
                        secrets=(*self._secrets, *_header_secrets(headers)),
                        follow_redirects=self._follow_redirects,
                        **parts,
                    )
            except EspAuthError:
                if self._token is None or renewed:
                    raise
                self._token.invalidate()
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _wait_for_hold(self, where: str) -> None:
        """Wait out an earlier answer's Retry-After, or fail at once when it is too far away."""
        hold = self._hold_until - time.monotonic()
        if hold > self._timeout_s:
            raise EspUnavailableError(f"{where}: rate limited by the ESP for {hold:.0f}s more", hold)
        if hold > 0:
            await asyncio.sleep(hold)  # the ESP's Retry-After of an earlier call


def _header_secrets(headers: Mapping[str, str]) -> list[str]:
    """Credential header values, and the credential after their scheme (``Bearer <token>``)."""
    values = [v for k, v in headers.items() if k.lower() == "authorization"]
    return values + [v.partition(" ")[2] for v in values]


class OAuth2Token:
    """An OAuth2 bearer token from a token endpoint (password or client-credentials grant).

    Refreshed ``margin_s`` before it expires (with the refresh token when the ESP gave one), and
    fetched anew after :meth:`invalidate` (a 401 on an API call).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        token_url: str,
        grant: dict[str, str],
        basic: tuple[str, str] | None = None,
        margin_s: float = 60.0,
        timeout_s: float = 30.0,
    ) -> None:
        self._session = session
        self._url = token_url
        self._grant = grant
        self._headers = {"Authorization": aiohttp.encode_basic_auth(*basic)} if basic else {}
        self._margin_s = margin_s
        self._timeout_s = timeout_s
        self._token: str | None = None
        self._refresh: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def authorization(self) -> str:
        """``Bearer <token>``, valid for at least ``margin_s`` more seconds."""
        async with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at - self._margin_s:
                await self._fetch()
            return f"Bearer {self._token}"

    def invalidate(self) -> None:
        """Forget the token (it was refused)."""
        self._token = None

    async def _fetch(self) -> None:
        form = dict(self._grant)
        if self._refresh:
            form = {
                **{k: v for k, v in form.items() if k in ("client_id", "client_secret")},
                "grant_type": "refresh_token",
                "refresh_token": self._refresh,
            }
        where = f"token endpoint {redact(self._url)}"
        try:
            async with self._session.post(
                self._url,
                data=form,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            ) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError:
            raise EspUnavailableError(f"{where}: no complete answer within {self._timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            secrets = [*self._grant.values(), *_header_secrets(self._headers)]
            raise EspUnavailableError(f"{where}: {type(exc).__name__}: {redact(str(exc), secrets)}") from None
        if status in (400, 401, 403) and form.get("grant_type") == "refresh_token":
            self._refresh = None  # the refresh token is spent or revoked: use the grant itself
            await self._fetch()
            return
        if status in (400, 401, 403):
            raise EspAuthError(f"{where} refused the credentials ({status})")
        if status != 200:
            raise EspUnavailableError(f"{where} answered {status}", status=status)
        try:
            data = orjson.loads(body)
            self._token = str(data["access_token"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise EspUnavailableError(f"{where} answered without access_token") from None
        self._refresh = data.get("refresh_token") or self._refresh
        self._expires_at = time.monotonic() + float(data.get("expires_in") or 3600)
        self.fetches += 1
