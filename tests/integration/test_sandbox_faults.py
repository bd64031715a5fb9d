"""The sandbox ESP's faults on request (``ESPBRIDGE_SANDBOX_FAULTS``), seen by a client of a real
``python -m sandbox`` process: what each fault looks like on the wire, that ``after`` faults come
after the ESP did the work, and the counters tests read."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.fixtures.sandbox import SandboxClient, Sandboxes

RULES: list[dict[str, Any]] = [
    {"name": "create import", "method": "POST", "path": "/imports$", "fault": "reset", "when": "after"},
    {"name": "read import", "method": "GET", "path": "/imports/", "fault": "timeout", "delay_s": 20},
    {"name": "list sends", "method": "GET", "path": "/sends$", "fault": 429, "retry_after_s": 7},
    {"name": "list sends 5xx", "method": "GET", "path": "/sends$", "fault": "503", "skip": 2, "times": 2},
]


def drop_list(esp: SandboxClient, name: str) -> str:
    return esp.upload(f"drop/{name}", b"Email,CommunicationKey\na@example.com,k1\n")


async def answer(
    http: aiohttp.ClientSession, method: str, url: str, timeout_s: float = 5.0, **kwargs: Any
) -> tuple[int | None, str]:
    """(status, body) of a call; (the status if one came, the exception's name) if it broke."""
    status = None
    try:
        async with http.request(
            method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs
        ) as resp:
            status = resp.status
            return status, (await resp.read()).decode()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return status, type(exc).__name__


async def faults(http: aiohttp.ClientSession, esp: SandboxClient) -> dict[str, dict[str, Any]]:
    async with http.get(f"{esp.url}/_sandbox/faults", headers=esp.headers) as resp:
        assert resp.status == 200
        body = await resp.json()
    return {r["name"]: r for r in body["rules"]}


async def test_faults_break_the_answers_they_pick(sandbox: Sandboxes) -> None:
    with sandbox(faults=json.dumps(RULES)) as esp:
        async with aiohttp.ClientSession(headers=esp.headers) as http:
            body = {"file": drop_list(esp, "job-1.csv"), "list_name": "l", "external_id": "job-1"}

            # reset after: the import exists, but its answer stops mid-body.
            assert await answer(http, "POST", esp.api() + "/imports", json=body) == (
                202,
                "ClientPayloadError",
            )
            async with http.get(esp.api() + "/_sandbox/stats") as resp:
                assert (await resp.json())["imports_created"] == {"job-1": 1}
            async with http.post(esp.api() + "/imports", json=body) as resp:
                assert resp.status == 200, "asked again, the ESP answers the import it made"
                import_id = (await resp.json())["import_id"]

            # timeout: no answer while the client waits; the next request is answered at once.
            url = f"{esp.api()}/imports/{import_id}"
            assert await answer(http, "GET", url, timeout_s=0.5) == (None, "TimeoutError")
            assert (await answer(http, "GET", url, timeout_s=5))[0] == 200

            # 429 with Retry-After; the 503 rule lets its first two matches through (the 429 was one).
            statuses = []
            for _ in range(5):
                async with http.get(esp.api() + "/sends", params={"external_id": "job-1"}) as resp:
                    statuses.append(resp.status)
                    if resp.status == 429:
                        assert resp.headers["Retry-After"] == "7"
                    if resp.status >= 400:
                        assert (await resp.json())["message"].startswith("sandbox fault: ")
            assert statuses == [429, 200, 503, 503, 200]

            report = await faults(http, esp)
            assert {name: (r["matched"], r["fired"]) for name, r in report.items()} == {
                "create import": (2, 1),
                "read import": (2, 1),
                "list sends": (5, 1),
                "list sends 5xx": (5, 2),
            }
            async with (
                aiohttp.ClientSession() as anonymous,
                anonymous.get(f"{esp.url}/_sandbox/faults") as resp,
            ):
                assert resp.status == 401
        log = esp.log_text()
        assert log.count('"msg":"fault injected"') == 5
        assert esp.token not in log
    # the block's end checked that it stopped with exit code 0 on SIGTERM
