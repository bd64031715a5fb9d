"""The connectors' HTTP kit against a real aiohttp server on loopback: error mapping and
redaction, OAuth2 token fetch/refresh/retry on 401, and the client-side rate limiter (in memory,
and shared by processes through PostgreSQL: the same rule)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from shared.esp import AccountConfig, rest
from shared.esp.limits import RateLimits
from shared.infra.settings import PostgresSettings
from shared.model.errors import ConfigurationError
from tests.fixtures.fake_esp import FakeEsp, served


@dataclass
class Esp(FakeEsp):
    """A token endpoint, a resource that wants a valid bearer token, and any status on demand."""

    failures: list[tuple[int, str]] = field(default_factory=list)  # the next answers of /flaky
    tokens_issued: list[str] = field(default_factory=list)
    grants: list[dict[str, str]] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    refuse_all: bool = False

    def application(self) -> web.Application:
        async def token(request: web.Request) -> web.Response:
            form = dict(await request.post())
            self.grants.append({k: str(v) for k, v in form.items()})
            if form.get("grant_type") == "password" and form.get("password") != "right":
                return web.json_response({"error": "invalid_grant"}, status=400)
            issued = f"t{len(self.tokens_issued)}"
            self.tokens_issued.append(issued)
            self.valid = {issued}
            return web.json_response(
                {"access_token": issued, "refresh_token": f"r{issued}", "expires_in": 3600}
            )

        async def data(request: web.Request) -> web.Response:
            presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if self.refuse_all or presented not in self.valid:
                return web.json_response({"ErrorCode": "401", "ErrorDescription": "expired"}, status=401)
            return web.json_response({"ok": True})

        async def status(request: web.Request) -> web.Response:
            code = int(request.match_info["code"])
            headers = {"Retry-After": "7"} if code == 429 else {}
            return web.json_response(
                {"ErrorCode": str(code), "ErrorDescription": "x"}, status=code, headers=headers
            )

        async def echo(request: web.Request) -> web.Response:
            """A careless ESP: its error body repeats the query string and the key it was sent."""
            key = request.query.get("api_key") or str((await request.post()).get("api_key"))
            message = f"cannot serve {request.path_qs} for key {key}"
            return web.json_response({"message": message}, status=int(request.match_info["code"]))

        async def flaky(request: web.Request) -> web.Response:
            if self.failures:
                code, retry_after = self.failures.pop(0)
                return web.json_response({}, status=code, headers={"Retry-After": retry_after})
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/echo/{code}", echo)
        app.router.add_get("/flaky", flaky)
        app.router.add_post("/token", token)
        app.router.add_get("/data", data)
        app.router.add_get("/status/{code}", status)
        return app


esp = served(Esp)

ACCOUNT = AccountConfig(esp="esp", account="acme", api_url="http://127.0.0.1:9", request_timeout_s=30)


@pytest.fixture(params=["in memory", "shared through PostgreSQL"])
async def limits(request: pytest.FixtureRequest, database: PostgresSettings) -> AsyncIterator[RateLimits]:
    """The rate limits of a process without a database, or of one with a database."""
    async with contextlib.AsyncExitStack() as stack:
        yield await RateLimits.open(stack, database if request.param != "in memory" else None)


def client(esp: Esp, token: rest.OAuth2Token, limiter: rest.Limiter | None = None) -> rest.EspClient:
    return rest.EspClient(esp.http, esp.url, account="esp/acme", timeout_s=30, token=token, limiter=limiter)


async def test_statuses_map_to_transient_and_permanent_errors(esp: Esp) -> None:
    with pytest.raises(rest.EspUnavailableError) as info:
        await rest.request_json(esp.http, "GET", f"{esp.url}/status/429")
    assert (info.value.retry_after_s, info.value.status) == (7.0, 429)
    with pytest.raises(rest.EspUnavailableError):
        await rest.request_json(esp.http, "GET", f"{esp.url}/status/503")
    with pytest.raises(ConfigurationError):
        await rest.request_json(esp.http, "GET", f"{esp.url}/status/401")
    with pytest.raises(rest.EspRequestError):
        await rest.request_json(esp.http, "GET", f"{esp.url}/status/422")
    assert (await rest.request_json(esp.http, "GET", f"{esp.url}/status/404"))[0] == 404
    with pytest.raises(rest.EspUnavailableError):
        await rest.request_json(esp.http, "GET", "http://127.0.0.1:9/closed", timeout_s=2)


def quoting(where: str, status: int, body: Any, text: str) -> Exception:
    """A connector's refusal that quotes the ESP's message."""
    return rest.EspRequestError(f"{where} answered {status}: {body['message']}")


@pytest.mark.parametrize(
    ("method", "code", "refusal"),
    [
        ("GET", 400, rest.refused),
        ("GET", 400, quoting),
        ("POST", 404, quoting),
        ("GET", 401, quoting),
        ("GET", 503, rest.refused),
    ],
)
async def test_no_error_text_carries_a_query_string_or_a_secret(
    esp: Esp, method: str, code: int, refusal: rest.Refusal
) -> None:
    api = rest.EspClient(
        esp.http,
        esp.url,
        account="esp/acme",
        timeout_s=5,
        auth_params={"api_id": "acme", "api_key": "k3y-s3cret"},
        answered=(200,),
        refusal=refusal,
    )
    with pytest.raises((rest.EspRequestError, rest.EspAuthError, rest.EspUnavailableError)) as info:
        await api.call(method, f"/echo/{code}", params={"list": "l1"}, form={"list": "l1"})
    text = str(info.value)
    assert f"answered {code}" in text
    assert "k3y-s3cret" not in text
    assert "for key ***" in text  # the ESP's answer quoted, the key starred
    assert "api_key" not in text
    assert "?…" in text  # the echoed query string is cut
    unreachable = rest.EspClient(
        esp.http, "http://127.0.0.1:9", account="esp/acme", timeout_s=2, auth_params={"api_key": "k3y-s3cret"}
    )
    with pytest.raises(rest.EspUnavailableError) as down:
        await unreachable.call("GET", "/closed")
    assert "k3y-s3cret" not in str(down.value)


@pytest.mark.parametrize(
    ("retries", "failures", "calls", "succeeds"),
    [
        (rest.Retries(), [(503, "0")], 1, False),  # the default repeats nothing
        (rest.Retries(attempts=3), [(503, "0"), (429, "0")], 3, True),
        (rest.Retries(attempts=2), [(503, "0"), (503, "0")], 2, False),
        (rest.Retries(attempts=3, rate_limits_only=True), [(429, "0"), (503, "0")], 2, False),
        (rest.Retries(attempts=3, max_wait_s=1), [(429, "5")], 1, False),  # the caller waits that long
        (rest.Retries(attempts=None, total_wait_s=0.25), [(503, "0.1")] * 5, 3, False),
        (rest.Retries(attempts=None, backoff_s=lambda n, e: 0.0), [(503, "")] * 3, 4, True),
    ],
)
async def test_a_call_is_repeated_as_the_esps_retries_say(
    esp: Esp, retries: rest.Retries, failures: list[tuple[int, str]], calls: int, succeeds: bool
) -> None:
    esp.failures = list(failures)
    api = rest.EspClient(esp.http, esp.url, account="esp/acme", timeout_s=5, retries=retries)
    if succeeds:
        assert await api.call("GET", "/flaky") == (200, {"ok": True})
    else:
        with pytest.raises(rest.EspUnavailableError):
            await api.call("GET", "/flaky")
    assert len(esp.calls("/flaky")) == calls


async def test_a_retry_after_holds_the_accounts_later_calls(esp: Esp) -> None:
    esp.failures = [(429, "30")]
    api = rest.EspClient(esp.http, esp.url, account="esp/acme", timeout_s=5, holds=True)
    with pytest.raises(rest.EspUnavailableError) as first:
        await api.call("GET", "/flaky")
    assert first.value.retry_after_s == 30
    with pytest.raises(rest.EspUnavailableError, match="rate limited by the ESP") as held:
        await api.call("GET", "/flaky")  # fails at once: the wait is longer than the timeout
    assert held.value.retry_after_s is not None
    assert 25 < held.value.retry_after_s <= 30
    assert len(esp.calls("/flaky")) == 1  # the held call never reached the ESP


async def test_a_refused_token_is_refreshed_once(esp: Esp) -> None:
    token = rest.OAuth2Token(
        esp.http,
        f"{esp.url}/token",
        {"grant_type": "password", "username": "u", "password": "right", "client_id": "c"},
    )
    api = client(esp, token)
    assert await api.call("GET", "/data") == (200, {"ok": True})
    assert await api.call("GET", "/data") == (200, {"ok": True})
    assert token.fetches == 1
    esp.valid = set()  # the ESP expires the token early: the call gets a 401
    assert await api.call("GET", "/data") == (200, {"ok": True})
    assert token.fetches == 2
    # first fetched by password, then renewed with the refresh token after the 401
    assert [g["grant_type"] for g in esp.grants] == ["password", "refresh_token"]
    assert esp.grants[1]["refresh_token"] == "rt0"
    esp.refuse_all = True
    calls = len(esp.calls("/data"))
    with pytest.raises(rest.EspAuthError) as refused:
        await api.call("GET", "/data")
    assert len(esp.calls("/data")) - calls == 2  # one retry, never a loop
    assert "t3" not in str(refused.value)  # the refused token itself is not in the message


async def test_wrong_credentials_are_a_configuration_error(esp: Esp) -> None:
    token = rest.OAuth2Token(esp.http, f"{esp.url}/token", {"grant_type": "password", "password": "wrong"})
    with pytest.raises(rest.EspAuthError, match="refused the credentials"):
        await client(esp, token).call("GET", "/data")


async def test_rate_limiter_keeps_calls_under_the_limit(esp: Esp, limits: RateLimits) -> None:
    limiter = limits.limiter(ACCOUNT, 5, per_s=0.5)
    token = rest.OAuth2Token(esp.http, f"{esp.url}/token", {"grant_type": "client_credentials"})
    api = client(esp, token, limiter)
    for _ in range(12):
        await api.call("GET", "/data")
    # a call holds its slot until 0.5 s after its answer came, so the server never sees a sixth
    # call within 0.5 s, whatever the calls' time on the way
    assert len(esp.calls("/data")) == 12
    assert esp.most_within(0.5, "/data") <= 5
    # 12 calls at 5 per 0.5 s reach the server in three windows: the 6th and the 11th wait
    arrivals = esp.arrivals("/data")
    assert all(later - earlier >= 0.5 for earlier, later in zip(arrivals, arrivals[5:], strict=False))


async def test_a_call_slow_to_arrive_still_counts_against_the_next_one(limits: RateLimits) -> None:
    """The server sees a call somewhere between its start and its end: the slot stays taken until
    ``per_s`` after the end, so a slow call and the next ones never meet in one window there."""
    limiter = limits.limiter(ACCOUNT, 2, per_s=0.4)
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
    limiter = rest.RateLimiter(1, per_s=0.2)
    with pytest.raises(RuntimeError):
        async with limiter.slot():
            raise RuntimeError("refused")
    assert limiter.taken == 1  # the failed call counted
    taken_inside: list[int] = []

    async def waiting() -> None:
        async with limiter.slot():
            taken_inside.append(limiter.taken)

    await asyncio.wait_for(waiting(), 5)
    # it got in once the failed call's slot had aged out: only its own slot was taken then
    assert taken_inside == [1]
