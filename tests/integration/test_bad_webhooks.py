"""Bad webhook calls to the real gatherer's endpoint, for the ESPs that have webhooks (Optimizely:
JSON with Basic authentication; MailUp: a form with a shared Secret).

Unauthenticated calls get 401, a log line and a dead letter without their body (it may carry a
credential), never an event; a call for an account without webhooks gets 404 without naming any
account; a malformed body from an authenticated ESP gets 400 and a dead letter with the original
bytes; a bad item
among good ones is a dead letter while the good ones load; a good signed call right after loads."""

from __future__ import annotations

import base64
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from shared.infra.db import connect
from shared.infra.settings import PostgresSettings
from shared.model.messages import DeadLetter
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment
from tests.fixtures.jobs import record_jobs
from tests.fixtures.kafka import read_until
from tests.fixtures.processes import healthy, stop
from tests.fixtures.servers import free_port
from tests.fixtures.waits import wait_for

JOB = "job-hooks"
SECRET = "hook-secret"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def opt_event(recipient: str, kind: str = "open") -> dict[str, Any]:
    return {
        "type": kind,
        "mailingId": 1001,
        "recipientId": recipient,
        "created": "2026-11-22T10:00:00Z",
        "data": {"email": f"{recipient}@x.com", "BroadcastId": JOB},
    }


def mailup_form(email: str, secret: str | None = SECRET, job: str = f"42:{JOB}") -> bytes:
    form = {
        "Secret": secret,
        "EventType": "Unsubscribe",
        "EventSource": "Recipient",
        "EventDate": "2026-11-22T12:00:03.695+01",
        "IdList": "1",
        "IdNL": "42",
        "Email": email,
        "Reason": "1",
        "Job": job,
        "Key": "K-" + email,
    }
    return urlencode({k: v for k, v in form.items() if v is not None}).encode()


async def test_bad_webhook_calls_are_refused_and_good_ones_still_load(deployment: Deployment) -> None:
    database, unique = deployment.database, deployment.unique
    opt, mup = f"o{unique}", f"m{unique}"
    entries = [
        deployment.offline_account("optimizely", opt, SECRET),
        deployment.offline_account("mailup", mup, SECRET),
        deployment.offline_account("generic_sftp", "plain", SECRET),
    ]
    accounts = deployment.accounts_file(entries)
    await record_jobs(database, "optimizely", opt, JOB)
    port = free_port()
    env = deployment.env(accounts, ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="30")
    base = f"http://127.0.0.1:{port}/webhooks"
    answers: dict[str, tuple[int, Any]] = {}
    with ExitStack() as stack:
        gatherer = deployment.start(stack, "gatherer", {**env, "ESPBRIDGE_HTTP_PORT": str(port)})
        loader = deployment.start(stack, "loader", env)
        await wait_for(lambda: healthy(port), timeout_s=60, what="gatherer up")
        async with aiohttp.ClientSession() as http:

            async def call(name: str, path: str, body: bytes, headers: dict[str, str]) -> None:
                async with http.post(f"{base}/{path}", data=body, headers=headers) as resp:
                    answers[name] = (resp.status, await resp.json())

            json_type = {"Content-Type": "application/json"}
            form_type = {"Content-Type": "application/x-www-form-urlencoded"}
            good_auth = {**json_type, **basic("espbridge", SECRET)}
            calls = [
                ("opt-unsigned", f"optimizely/{opt}", orjson.dumps(opt_event("u1")), json_type),
                (
                    "opt-wrong-password",
                    f"optimizely/{opt}",
                    orjson.dumps(opt_event("u2")),
                    {**json_type, **basic("espbridge", "guess")},
                ),
                (
                    "opt-wrong-scheme",
                    f"optimizely/{opt}",
                    orjson.dumps(opt_event("u3")),
                    {**json_type, "Authorization": f"Bearer {SECRET}"},
                ),
                ("mailup-unsigned", f"mailup/{mup}", mailup_form("u4@x.com", secret=None), form_type),
                ("mailup-wrong-secret", f"mailup/{mup}", mailup_form("u5@x.com", secret="guess"), form_type),
                ("unknown-account", "optimizely/nobody", orjson.dumps(opt_event("u6")), good_auth),
                ("no-webhooks", "generic_sftp/plain", orjson.dumps(opt_event("u7")), good_auth),
                ("opt-not-json", f"optimizely/{opt}", b"\xff{not json", good_auth),
                ("opt-not-an-event", f"optimizely/{opt}", b"42", good_auth),
                (
                    "opt-one-bad-item",
                    f"optimizely/{opt}",
                    orjson.dumps([opt_event("g1"), opt_event("b1", "teleport")]),
                    good_auth,
                ),
                ("mailup-bad-job", f"mailup/{mup}", mailup_form("b2@x.com", job="not-a-job"), form_type),
                (
                    "opt-good",
                    f"optimizely/{opt}",
                    orjson.dumps(opt_event("g2", "click") | {"url": "https://x.com/"}),
                    good_auth,
                ),
                ("mailup-good", f"mailup/{mup}", mailup_form("g3@x.com"), form_type),
            ]
            bodies = {name: body for name, _, body, _ in calls}
            for name, path, body, headers in calls:
                await call(name, path, body, headers)

        loaded = await wait_for(
            lambda: recipients(database, 3), timeout_s=60, what="the good webhook events loaded"
        )
        records = await read_until(deployment.kafka, Topic.DEADLETTER, lambda rs: len(rs) >= 9)
        for proc in (gatherer, loader):
            assert stop(proc) == 0

    status = {name: code for name, (code, _) in answers.items()}
    assert status == {
        "opt-unsigned": 401,
        "opt-wrong-password": 401,
        "opt-wrong-scheme": 401,
        "mailup-unsigned": 401,
        "mailup-wrong-secret": 401,
        "unknown-account": 404,
        "no-webhooks": 404,
        "opt-not-json": 400,
        "opt-not-an-event": 400,
        "opt-one-bad-item": 200,
        "mailup-bad-job": 200,
        "opt-good": 200,
        "mailup-good": 200,
    }
    assert answers["opt-one-bad-item"][1] == {"accepted": 1, "rejected": 1}
    assert answers["mailup-bad-job"][1] == {"accepted": 0, "rejected": 1}
    assert "configured" not in str(answers["unknown-account"][1]), "a 404 names no configured account"
    assert "the webhook call's Basic authorization is wrong" in answers["opt-wrong-password"][1]["message"]
    assert loaded == {"g1", "g2", "K-g3@x.com"}, "only the good, authenticated events were loaded"

    every = [DeadLetter.from_json(r.value or b"") for r in records]
    refused = [d for d in every if d.error_class == "WebhookAuthError"]
    assert len(refused) == 5
    assert all(d.payload == b"" for d in refused), "an unauthenticated call's body is never kept"
    letters = [d for d in every if d.error_class != "WebhookAuthError"]
    assert len(letters) == 4, [(d.error_class, d.message) for d in letters]
    by_payload = {d.payload: d for d in letters}
    for name in ("opt-not-json", "opt-not-an-event"):
        letter = by_payload[bodies[name]]  # the body exactly as received
        assert (letter.source.kind, letter.source.name) == ("webhook", f"webhook:optimizely/{opt}")
        assert letter.error_class == "PermanentError"
    assert "not JSON" in by_payload[bodies["opt-not-json"]].message
    (item,) = [d for d in letters if d.error_class == "BadWebhookItem" and "optimizely" in d.source.name]
    assert orjson.loads(item.payload) == opt_event("b1", "teleport")
    assert (item.source.line, item.message) == (2, "unknown type 'teleport'")
    (form,) = [d for d in letters if "mailup" in d.source.name]
    assert b"Job=not-a-job" in form.payload
    assert b"Secret" not in form.payload, "the shared secret is not copied to the dead-letter topic"

    log = (deployment.folder / "gatherer.log").read_text()
    assert log.count('"msg":"webhook refused: not authenticated"') == 5
    assert log.count('"msg":"webhook body rejected to the dead-letter topic"') == 2
    # These accounts have no response folders on the SFTP site: the scan says so and goes on.
    assert '"msg":"response folder not scanned"' in log


async def recipients(pg: PostgresSettings, n: int) -> set[str] | None:
    """The recipients of the loaded events once there are ``n`` or more; None until then."""
    conn = await connect(pg)
    try:
        rows = await conn.fetch("SELECT communication_key FROM responses.events")
    finally:
        await conn.close()
    found = {r["communication_key"] for r in rows}
    return found if len(found) >= n else None
