"""The ESP misbehaves on every call the monitor and the gatherer make to it: one broadcast per
fault kind through the four services, and still nothing is lost, nothing is duplicated and no
broadcast is sent twice.

Two ESPs run side by side in each pipeline: the default ``sandbox`` ESP (generic connector:
the monitor's import, import status, send, find send and send status calls; its responses are
files) and ``instiller`` (the same calls in its own API, and the gatherer's paged export pulls).
The calls that change something at the ESP (creating the import, creating the send) get their
fault *after* the ESP did the work, so the client loses the answer to a call that worked; the
reads get it instead of an answer.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from typing import Any

import aiohttp
import pytest

from shared.model.messages import Stage, State
from shared.model.topics import Topic
from shared.operations.jobs import read_statuses
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import count_records
from tests.fixtures.pipeline import Pipeline, loaded_as_made, loaded_counts, start_pipeline, wait_all_loaded

GENERIC = r"^/api/v1/accounts/[^/]+"
CALLS: dict[str, list[dict[str, Any]]] = {
    # esp: every HTTP call espbridge makes to it, with the fault's timing and count; "once": a
    # call espbridge must never repeat (the ESP is asked instead), whatever the ESP would do with it
    "sandbox": [
        {"name": "create import", "method": "POST", "path": GENERIC + "/imports$", "when": "after"},
        {"name": "import status", "method": "GET", "path": GENERIC + "/imports/[^/]+$", "times": 2},
        {"name": "create send", "method": "POST", "path": GENERIC + "/sends$", "when": "after", "once": True},
        {"name": "find send", "method": "GET", "path": GENERIC + "/sends$"},
        {"name": "send status", "method": "GET", "path": GENERIC + "/sends/[^/]+$"},
    ],
    "instiller": [
        {"name": "import file", "method": "POST", "path": "^/rest/lists/import_file$", "when": "after"},
        {"name": "import status", "method": "GET", "path": "^/rest/lists/import_status$", "times": 2},
        {"name": "send", "method": "POST", "path": "^/rest/emails/send$", "when": "after", "once": True},
        {"name": "list sends", "method": "GET", "path": "^/rest/emails/list_sends$"},
        {"name": "send status", "method": "GET", "path": "^/rest/emails/send_status$"},
        {"name": "export responses", "method": "GET", "path": "^/rest/emails/export_responses$", "times": 2},
    ],
}

RECIPIENTS = 300
REQUEST_TIMEOUT_S = 1.0
"""The connectors' request timeout (the account entries' ``request_timeout_s``): what a held call costs."""

# An import and a send must still be running when the monitor first gets an answer about them
# (after the lost answer and the wait before asking again), or it never polls their status. A 429
# makes the client wait its Retry-After (1 s) and a timeout costs it REQUEST_TIMEOUT_S, so those
# need the longest; the sandbox's import takes twice IMPORT_DELAY_S.
TIMING = {
    "429": {"import_delay_s": "1.5", "send_delay_s": "4"},
    "timeout": {"import_delay_s": "1.5", "send_delay_s": "4.5"},
    "quick": {"import_delay_s": "0.6", "send_delay_s": "2"},
}


def rules(fault: str) -> list[dict[str, Any]]:
    """The sandbox's fault rules: every call of every ESP gets ``fault``."""
    return [
        {
            **{k: v for k, v in call.items() if k != "once"},
            "name": f"{esp}: {call['name']}",
            "fault": fault,
            "delay_s": 30,
            "retry_after_s": 1,
        }
        for esp, calls in CALLS.items()
        for call in calls
    ]


async def fault_report(pipeline: Pipeline, esp: str) -> dict[str, dict[str, Any]]:
    """The rules of the ESP's sandbox that are about this ESP, by name, with their counts."""
    sandbox = pipeline.esps[esp]
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{sandbox.url}/_sandbox/faults", headers=sandbox.headers) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    return {r["name"]: r for r in body["rules"] if r["name"].startswith(f"{esp}: ")}


@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout", "reset"])
async def test_every_esp_call_survives_the_fault(fault: str, deployment: Deployment) -> None:
    await deployment.seed(RECIPIENTS)
    timing = TIMING.get(fault, TIMING["quick"])
    with ExitStack() as stack:
        pipeline = start_pipeline(
            stack,
            deployment,
            [(esp, f"f{deployment.unique}") for esp in CALLS],
            sandbox_settings={"faults": json.dumps(rules(fault)), "phase_delay_s": "0.1", **timing},
            account_fields={"request_timeout_s": REQUEST_TIMEOUT_S},
        )
        jobs = {esp: await pipeline.publish(esp, f"fault-{fault}-{esp}-{deployment.unique}") for esp in CALLS}
        for esp, job in jobs.items():
            manifest = await wait_all_loaded(pipeline, esp, job.job_id, timeout_s=120)
            assert manifest["recipients"] == RECIPIENTS - RECIPIENTS // 33
            # Every response exactly once, whatever broke on the way.
            assert await loaded_counts(deployment.database, job.job_id) == loaded_as_made(manifest)
            stats = await pipeline.stats(esp)
            assert stats["sends_created"] == {job.job_id: 1}, "the broadcast was sent once"
            assert stats["imports_created"] == {job.job_id: 1}
            report = await fault_report(pipeline, esp)
            assert report.keys() == {f"{esp}: {c['name']}" for c in CALLS[esp]}
            unfired = {
                name: (r["fired"], r["times"]) for name, r in report.items() if r["fired"] < r["times"]
            }
            assert not unfired, f"calls that never got their {fault} faults (fired, times): {unfired}"
            repeated = {
                c["name"]: report[f"{esp}: {c['name']}"]["matched"]
                for c in CALLS[esp]
                if c.get("once") and report[f"{esp}: {c['name']}"]["matched"] != 1
            }
            assert not repeated, f"send calls made more than once: {repeated}"
            statuses = await read_statuses(deployment.kafka, job.job_id)
            reached = {(s.stage, s.state) for s in statuses}
            for stage in (Stage.UPLOAD, Stage.IMPORT, Stage.SEND):
                assert (stage, State.DONE) in reached, f"{esp}: {stage} not done: {sorted(reached)}"
            assert not [s for s in statuses if s.state is State.FAILED]
        assert await count_records(deployment.kafka, Topic.DEADLETTER) == 0, (
            "a broken answer is retried, never dead-lettered"
        )
        if fault == "timeout":
            logs = (deployment.folder / f"{name}.log" for name in ("monitor", "gatherer"))
            logged = "".join(log.read_text() for log in logs)
            assert f"no complete answer within {REQUEST_TIMEOUT_S:g}s" in logged, "a timeout says how long"
        pipeline.stop()
