"""JSON over HTTP for connectors: one error mapping for every ESP call.

401/403 are permanent (credentials); 404 and 409 are answered to the caller; 429 and 5xx,
timeouts and dropped connections are transient and carry the server's Retry-After when given.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import orjson

from shared.model.errors import ConfigurationError, PermanentError, TransientError


class EspUnavailableError(TransientError):
    """The ESP did not answer usefully now (timeout, dropped connection, 5xx, 429)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EspRequestError(PermanentError):
    """The ESP refused the request as such (4xx other than 401, 403, 404, 409, 429)."""


class EspAuthError(ConfigurationError):
    """The ESP refused the credentials (401 or 403)."""


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    json: Any = None,
    params: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    expect: tuple[int, ...] = (200, 201, 202),
    form: dict[str, str] | None = None,
    multipart: bool = False,
) -> tuple[int, Any]:
    """One call; returns (status, parsed body) for expected statuses and 404/409, raises otherwise.

    The body is ``json``, or ``form`` fields (url-encoded, or ``multipart/form-data`` with
    ``multipart``): one error mapping whatever the ESP wants its bodies in.
    """
    all_headers = {"Accept": "application/json", **(headers or {})}
    data: Any = None
    if json is not None:
        data = orjson.dumps(json)
        all_headers["Content-Type"] = "application/json"
    elif form is not None:
        data = aiohttp.FormData(default_to_multipart=multipart)
        for key, value in form.items():
            data.add_field(key, value)
    try:
        async with session.request(
            method,
            url,
            data=data,
            params=params,
            headers=all_headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            body = await resp.read()
            status = resp.status
            retry_after = _retry_after(resp.headers.get("Retry-After"))
    except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors, some ClientErrors too
        raise EspUnavailableError(f"{method} {url}: no complete answer within {timeout_s:g}s") from exc
    except aiohttp.ClientError as exc:
        raise EspUnavailableError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
    where = f"{method} {url} answered {status}"
    if status == 429 or status >= 500:
        raise EspUnavailableError(f"{where}: {body[:300]!r}", retry_after)
    if status in (401, 403):
        raise EspAuthError(f"{where}: the ESP refused the credentials: {body[:300]!r}")
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        raise EspUnavailableError(f"{where} with a body that is not JSON: {body[:200]!r}") from None
    if status in expect or status in (404, 409):
        return status, parsed
    raise EspRequestError(f"{where}: {body[:500]!r}")


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


class TokenSource(Protocol):
    """Something that produces an Authorization header value and can be told it was refused."""

    async def authorization(self) -> str:
        """The header value, fetching or refreshing the token when needed."""
        ...

    def invalidate(self) -> None:
        """The ESP refused the current token: fetch a new one next time."""
        ...


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
        try:
            async with self._session.post(
                self._url,
                data=form,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            ) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError as exc:
            raise EspUnavailableError(
                f"token endpoint {self._url}: no complete answer within {self._timeout_s:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise EspUnavailableError(f"token endpoint {self._url}: {type(exc).__name__}: {exc}") from exc
        if status in (400, 401, 403) and form.get("grant_type") == "refresh_token":
            self._refresh = None  # the refresh token is spent or revoked: use the grant itself
            await self._fetch()
            return
        if status in (400, 401, 403):
            raise EspAuthError(f"token endpoint {self._url} refused the credentials ({status})")
        if status != 200:
            raise EspUnavailableError(f"token endpoint {self._url} answered {status}")
        try:
            data = orjson.loads(body)
            self._token = str(data["access_token"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise EspUnavailableError(f"token endpoint {self._url} answered without access_token") from None
        self._refresh = data.get("refresh_token") or self._refresh
        self._expires_at = time.monotonic() + float(data.get("expires_in") or 3600)
        self.fetches += 1


async def request_with_token(
    session: aiohttp.ClientSession,
    token: TokenSource,
    method: str,
    url: str,
    *,
    limiter: RateLimiter | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """:func:`request_json` with a bearer token; a 401 refreshes the token and retries once."""
    for attempt in (1, 2):
        auth = {"Authorization": await token.authorization()}
        try:
            async with limiter.slot() if limiter is not None else contextlib.nullcontext():
                return await request_json(session, method, url, headers={**(headers or {}), **auth}, **kwargs)
        except EspAuthError:
            if attempt == 2:
                raise
            token.invalidate()
    raise AssertionError("unreachable")  # the loop returns or raises
