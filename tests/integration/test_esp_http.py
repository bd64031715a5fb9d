"""The connectors' HTTP helpers against a real aiohttp server on loopback: error mapping,
OAuth2 token fetch/refresh/retry on 401, and the client-side rate limiter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from shared.esp.rest import (
    EspAuthError,
    EspRequestError,
    EspUnavailableError,
    OAuth2Token,
    RateLimiter,
    request_json,
    request_with_token,
)
from shared.model.errors import ConfigurationError


@dataclass
class Esp:
    url: str
    tokens_issued: list[str] = field(default_factory=list)
    grants: list[dict[str, str]] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    calls: list[float] = field(default_factory=list)
    refuse_all: bool = False


@pytest.fixture
async def esp() -> AsyncIterator[Esp]:
    state = Esp(url="")

    async def token(request: web.Request) -> web.Response:
        form = dict(await request.post())
        state.grants.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") == "password" and form.get("password") != "right":
            return web.json_response({"error": "invalid_grant"}, status=400)
        issued = f"t{len(state.tokens_issued)}"
        state.tokens_issued.append(issued)
        state.valid = {issued}
        return web.json_response({"access_token": issued, "refresh_token": f"r{issued}", "expires_in": 3600})

    async def data(request: web.Request) -> web.Response:
        state.calls.append(time.monotonic())
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if state.refuse_all or presented not in state.valid:
            return web.json_response({"ErrorCode": "401", "ErrorDescription": "expired"}, status=401)
        return web.json_response({"ok": True})

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        headers = {"Retry-After": "7"} if code == 429 else {}
        return web.json_response(
            {"ErrorCode": str(code), "ErrorDescription": "x"}, status=code, headers=headers
        )

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/data", data)
    app.router.add_get("/status/{code}", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def test_statuses_map_to_transient_and_permanent_errors(esp: Esp) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(EspUnavailableError) as info:
            await request_json(http, "GET", f"{esp.url}/status/429")
        assert info.value.retry_after_s == 7.0
        with pytest.raises(EspUnavailableError):
            await request_json(http, "GET", f"{esp.url}/status/503")
        with pytest.raises(ConfigurationError):
            await request_json(http, "GET", f"{esp.url}/status/401")
        with pytest.raises(EspRequestError):
            await request_json(http, "GET", f"{esp.url}/status/422")
        assert (await request_json(http, "GET", f"{esp.url}/status/404"))[0] == 404
        with pytest.raises(EspUnavailableError):
            await request_json(http, "GET", "http://127.0.0.1:9/closed", timeout_s=2)


async def test_a_refused_token_is_refreshed_once(esp: Esp) -> None:
    async with aiohttp.ClientSession() as http:
        token = OAuth2Token(
            http,
            f"{esp.url}/token",
            {"grant_type": "password", "username": "u", "password": "right", "client_id": "c"},
        )
        assert await request_with_token(http, token, "GET", f"{esp.url}/data") == (200, {"ok": True})
        assert await request_with_token(http, token, "GET", f"{esp.url}/data") == (200, {"ok": True})
        assert token.fetches == 1
        esp.valid = set()  # the ESP expires the token early: the call gets a 401
        assert await request_with_token(http, token, "GET", f"{esp.url}/data") == (200, {"ok": True})
        assert token.fetches == 2
        # first fetched by password, then renewed with the refresh token after the 401
        assert [g["grant_type"] for g in esp.grants] == ["password", "refresh_token"]
        assert esp.grants[1]["refresh_token"] == "rt0"
        esp.refuse_all = True
        calls = len(esp.calls)
        with pytest.raises(EspAuthError):
            await request_with_token(http, token, "GET", f"{esp.url}/data")
        assert len(esp.calls) - calls == 2  # one retry, never a loop


async def test_wrong_credentials_are_a_configuration_error(esp: Esp) -> None:
    async with aiohttp.ClientSession() as http:
        token = OAuth2Token(http, f"{esp.url}/token", {"grant_type": "password", "password": "wrong"})
        with pytest.raises(EspAuthError, match="refused the credentials"):
            await request_with_token(http, token, "GET", f"{esp.url}/data")


async def test_rate_limiter_keeps_calls_under_the_limit(esp: Esp) -> None:
    limiter = RateLimiter(5, per_s=0.5)
    async with aiohttp.ClientSession() as http:
        token = OAuth2Token(http, f"{esp.url}/token", {"grant_type": "client_credentials"})
        for _ in range(12):
            await request_with_token(http, token, "GET", f"{esp.url}/data", limiter=limiter)
    # a call holds its slot until 0.5 s after its answer came, so the server never sees a sixth
    # call within 0.5 s, whatever the calls' time on the way
    windows = [sum(1 for t in esp.calls if start <= t < start + 0.5) for start in esp.calls]
    assert max(windows) <= 5
    # 12 calls at 5 per 0.5 s need two waits (the first call also waits for the token fetch)
    assert esp.calls[-1] - esp.calls[0] >= 0.9


async def test_a_call_slow_to_arrive_still_counts_against_the_next_one() -> None:
    """The server sees a call somewhere between its start and its end: the slot stays taken until
    ``per_s`` after the end, so a slow call and the next ones never meet in one window there."""
    limiter = RateLimiter(2, per_s=0.4)
    arrived: list[float] = []

    async def call(on_the_way_s: float) -> None:
        async with limiter.slot():
            await asyncio.sleep(on_the_way_s)  # a new connection, a busy network
            arrived.append(time.monotonic())

    first = asyncio.create_task(call(0.3))
    await asyncio.sleep(0)  # the slow call starts first
    await asyncio.gather(first, call(0.0), call(0.0), call(0.0))
    arrived.sort()
    assert len(arrived) == 4
    # at most 2 arrivals in any 0.4 s: counted from the start, the third call would have gone at
    # 0.4 s, 0.1 s after the slow call arrived and with the second call in the same window
    assert all(later - earlier >= 0.4 for earlier, later in zip(arrived, arrived[2:], strict=False))


async def test_a_waiting_call_gets_the_slot_a_failed_call_frees() -> None:
    limiter = RateLimiter(1, per_s=0.2)
    with pytest.raises(RuntimeError):
        async with limiter.slot():
            raise RuntimeError("refused")
    started = time.monotonic()
    async with limiter.slot():
        waited = time.monotonic() - started
    assert 0.15 <= waited < 5.0  # the failed call counted, and its slot came free after per_s
