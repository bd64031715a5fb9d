"""JSON over HTTP for connectors: one error mapping for every ESP call.

401/403 are permanent (credentials); 404 and 409 are answered to the caller; 429 and 5xx,
timeouts and dropped connections are transient and carry the server's Retry-After when given.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from shared.errors import ConfigurationError, PermanentError, TransientError


class EspUnavailableError(TransientError):
    """The ESP did not answer usefully now (timeout, dropped connection, 5xx, 429)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EspRequestError(PermanentError):
    """The ESP refused the request as such (4xx other than 401, 403, 404, 409, 429)."""


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
) -> tuple[int, Any]:
    """One call; returns (status, parsed body) for expected statuses and 404/409, raises otherwise."""
    data = orjson.dumps(json) if json is not None else None
    all_headers = {"Accept": "application/json", **(headers or {})}
    if data is not None:
        all_headers["Content-Type"] = "application/json"
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
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise EspUnavailableError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
    where = f"{method} {url} answered {status}"
    if status == 429 or status >= 500:
        raise EspUnavailableError(f"{where}: {body[:300]!r}", retry_after)
    if status in (401, 403):
        raise ConfigurationError(f"{where}: the ESP refused the credentials")
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        raise EspUnavailableError(f"{where} with a body that is not JSON: {body[:200]!r}") from None
    if status in expect or status in (404, 409):
        return status, parsed
    raise EspRequestError(f"{where}: {body[:500]!r}")
