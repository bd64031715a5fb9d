"""Each ESP flavor through the whole pipeline, and two ESPs of different kinds at the same time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import orjson
import pytest

from shared.infra.db import connect
from shared.model.messages import BroadcastJob, DeadLetter, Stage, State
from shared.model.topics import Topic
from shared.operations.jobs import read_statuses
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import read_until
from tests.fixtures.pipeline import Pipeline, loaded_as_made, loaded_counts, start_pipeline, wait_all_loaded
from tests.fixtures.servers import free_port
from tests.fixtures.waits import wait_for

ESPS = ["generic_sftp", "instiller", "mailup", "optimizely", "deployteq"]
"""ESP flavors besides the default one (which tests/integration/test_end_to_end.py covers in depth)."""


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as processes:
        yield processes


async def started(
    stack: ExitStack,
    deployment: Deployment,
    esps: list[tuple[str, str]],
    recipients: int,
    **pipeline_args: Any,
) -> Pipeline:
    """Seed the CRM with ``recipients`` customers and start the pipeline against these ESP accounts."""
    await deployment.seed(recipients)
    return start_pipeline(stack, deployment, esps, **pipeline_args)


async def run_broadcast(
    stack: ExitStack, deployment: Deployment, esp: str, job_id: str, recipients: int, **pipeline_args: Any
) -> tuple[Pipeline, BroadcastJob, dict[str, Any]]:
    """Start the pipeline against one account of the ESP, publish one broadcast and wait until
    every response the ESP made is loaded — exactly: the loaded counts equal its manifest."""
    pipeline = await started(stack, deployment, [(esp, deployment.account)], recipients, **pipeline_args)
    job = await pipeline.publish(esp, job_id)
    manifest = await wait_all_loaded(pipeline, esp, job.job_id)
    assert await loaded_counts(deployment.database, job.job_id) == loaded_as_made(manifest)
    return pipeline, job, manifest


@pytest.mark.parametrize("esp", ESPS)
async def test_each_esp_end_to_end(esp: str, deployment: Deployment, stack: ExitStack) -> None:
    pipeline, job, manifest = await run_broadcast(
        stack, deployment, esp, f"e2e-{esp}-{deployment.unique}", 3000
    )
    assert manifest["recipients"] == 3000 - 3000 // 33
    assert await pipeline.sends_created(esp) == {job.job_id: 1}
    statuses = {(s.stage, s.state) for s in await read_statuses(deployment.kafka, job.job_id)}
    assert (Stage.UPLOAD, State.DONE) in statuses
    assert (Stage.IMPORT, State.DONE) in statuses
    pipeline.stop()


async def test_two_esps_of_different_kinds_at_the_same_time(deployment: Deployment, stack: ExitStack) -> None:
    esps = [("sandbox", f"a{deployment.unique}"), ("generic_sftp", f"b{deployment.unique}")]
    pipeline = await started(stack, deployment, esps, 2000)
    jobs = {esp: await pipeline.publish(esp, f"two-{esp}-{deployment.unique}") for esp, _ in esps}
    for esp, job in jobs.items():
        manifest = await wait_all_loaded(pipeline, esp, job.job_id)
        assert await loaded_counts(deployment.database, job.job_id) == loaded_as_made(manifest)
        assert await pipeline.sends_created(esp) == {job.job_id: 1}
    # Each list went to its own ESP's folder in its own format, and nothing crossed over.
    generic_list = pipeline.esps["sandbox"].account_dir(esps[0][1]) / "drop" / f"{jobs['sandbox'].job_id}.csv"
    sftp_list = (
        pipeline.esps["generic_sftp"].account_dir(esps[1][1]) / "drop" / f"{jobs['generic_sftp'].job_id}.txt"
    )
    assert generic_list.read_text().startswith("Email,FirstName,")
    assert sftp_list.read_text().startswith("Email\tFirstName\t")
    conn = await connect(deployment.database)
    try:
        by_esp = {
            (r["esp"], r["broadcast_id"])
            for r in await conn.fetch("SELECT DISTINCT esp, broadcast_id FROM responses.events")
        }
    finally:
        await conn.close()
    assert by_esp == {(esp, job.job_id) for esp, job in jobs.items()}
    pipeline.stop()


API_ESPS = ["instiller", "mailup", "optimizely"]
"""ESP flavors whose import or send goes through an API, so refused credentials fail the job.
(Deployteq's import and send are SFTP folder moves; its credentials matter only to the gatherer's
API pulls — see the test after this one.)"""


async def failures(deployment: Deployment, job_id: str, stage: Stage | None = None) -> list[str] | None:
    """The details of the job's failed statuses (at ``stage`` if given); None while there are none."""
    statuses = await read_statuses(deployment.kafka, job_id)
    found = [s.detail for s in statuses if s.state is State.FAILED and stage in (None, s.stage)]
    return found or None


@pytest.mark.parametrize("esp", API_ESPS)
async def test_refused_credentials_fail_the_job_clearly(
    esp: str, deployment: Deployment, stack: ExitStack
) -> None:
    pipeline = await started(stack, deployment, [(esp, deployment.account)], 200, wrong_credentials=True)
    job = await pipeline.publish(esp, f"auth-{deployment.unique}")
    details = await wait_for(lambda: failures(deployment, job.job_id), timeout_s=60, what="the job failed")
    assert "refused" in details[0]  # the ESP's word, e.g. "answered 401" or "refused the credentials (400)"
    assert await pipeline.sends_created(esp) == {}
    pipeline.stop()


async def test_refused_api_credentials_show_on_the_broadcast_status_and_files_still_load(
    deployment: Deployment, stack: ExitStack
) -> None:
    """Deployteq sends through its SFTP trigger, so a wrong client secret first shows when the
    gatherer pulls the event API: the broadcast's gather stage says so (once, not every scan),
    while the activities export files are still gathered."""
    esp = "deployteq"
    pipeline = await started(stack, deployment, [(esp, deployment.account)], 300, wrong_credentials=True)
    job = await pipeline.publish(esp, f"auth-{deployment.unique}")
    details = await wait_for(
        lambda: failures(deployment, job.job_id, Stage.GATHER),
        timeout_s=90,
        what="the gather stage reported the refusal",
    )
    assert "refused" in details[0]
    assert "EspAuthError" in details[0]
    assert await pipeline.sends_created(esp) == {job.job_id: 1}
    manifest = orjson.loads(pipeline.manifest(esp, job.job_id).read_bytes())
    # The export files (complaints) need no API credentials: they load once the export runs.
    exported = manifest["counts"].get("complaint", 0)

    async def complaints_loaded() -> bool:
        done = orjson.loads(pipeline.manifest(esp, job.job_id).read_bytes())
        have = (await loaded_counts(deployment.database, job.job_id)).get("complaint", 0)
        return bool(done["complete"]) and have == done["counts"].get("complaint", 0)

    await wait_for(complaints_loaded, timeout_s=90, what="the export files loaded")
    loaded = await loaded_counts(deployment.database, job.job_id)
    assert set(loaded) <= {"complaint"}, f"nothing came from the refused API: {loaded}"
    assert exported <= loaded.get("complaint", 0)
    refusals = await failures(deployment, job.job_id, Stage.GATHER)
    assert refusals is not None
    assert len(refusals) == 1, "a lasting error is reported once, not on every scan"
    pipeline.stop()


MALFORMED = {
    # esp: (sandbox settings that add malformed rows, account options, malformed rows in the manifest)
    "mailup": ({"bad_rows": "2"}, {"statistics_source": "export"}, lambda m: m["bad_rows"]),
    "optimizely": ({"opt_malformed_every": "2"}, {}, lambda m: m["malformed_rows"]),
    "deployteq": ({"malformed_every": "15"}, {}, lambda m: m["malformed"]),
}


async def dead_letters(deployment: Deployment, count: int) -> list[DeadLetter]:
    """The first ``count`` dead letters (waiting for them)."""
    records = await read_until(deployment.kafka, Topic.DEADLETTER, lambda rs: len(rs) >= count)
    return [DeadLetter.from_json(r.value or b"") for r in records]


@pytest.mark.parametrize("esp", sorted(MALFORMED))
async def test_malformed_response_rows_are_dead_lettered_and_good_rows_load(
    esp: str, deployment: Deployment, stack: ExitStack
) -> None:
    sandbox_settings, options, malformed = MALFORMED[esp]
    pipeline, _job, manifest = await run_broadcast(
        stack,
        deployment,
        esp,
        f"bad-{esp}-{deployment.unique}",
        1000,
        sandbox_settings=sandbox_settings,
        account_options=options,
    )
    bad = malformed(manifest)
    assert bad > 0
    dead = await dead_letters(deployment, bad)
    assert len(dead) == bad
    for d in dead:
        assert d.payload
        assert d.message
        assert d.service == "gatherer"
        if d.source.kind == "file":
            assert (d.source.name or "").startswith(f"{esp}/{deployment.account}/")
            assert (d.source.line or 0) > 1, "the line of the bad row, after the header"
    if esp != "optimizely":  # Optimizely's bad rows come from files and API pages alike
        assert {d.source.kind for d in dead} == {"file"}
    pipeline.stop()


@pytest.mark.parametrize("esp", ["instiller"])
async def test_rate_limits_are_honoured_and_malformed_items_dead_lettered(
    esp: str, deployment: Deployment, stack: ExitStack
) -> None:
    limits = {"api_limit_per_s": "3", "api_limit_burst": "2", "malformed_every": "40"}
    # espbridge's own limit well above the ESP's, so the ESP's 429s are what hold the calls back
    pipeline, job, manifest = await run_broadcast(
        stack,
        deployment,
        esp,
        f"limits-{deployment.unique}",
        1000,
        sandbox_settings=limits,
        account_options={"requests_per_second": 50},
    )
    bad = sum(manifest["malformed"].values())
    assert bad > 0
    dead = await dead_letters(deployment, bad)
    assert len(dead) == bad
    assert all(d.source.kind == "api" for d in dead)
    stats = await pipeline.stats(esp)
    assert stats["sends_created"] == {job.job_id: 1}
    assert stats.get("rate_limited", 0) > 0, "the ESP answered 429s, and the pipeline still loaded everything"
    pipeline.stop()


WEBHOOKS = {
    # esp: sandbox settings that make the ESP call espbridge's webhook endpoint ({url} filled in)
    "optimizely": lambda url, token: {
        "opt_webhook_url": url,
        "opt_webhook_auth": json.dumps({"type": "basicAuth", "userName": "espbridge", "password": token}),
        "opt_source_weights": "webhook=1",
    },
    "mailup": lambda url, token: {"mailup_webhook_url": url},
}


@pytest.mark.parametrize("esp", sorted(WEBHOOKS))
async def test_webhooks_reach_the_gatherer_and_load_once(
    esp: str, deployment: Deployment, stack: ExitStack
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/webhooks/{esp}/{deployment.account}"
    token = "webhook-" + deployment.unique
    pipeline, _job, _manifest = await run_broadcast(
        stack,
        deployment,
        esp,
        f"hook-{deployment.unique}",
        1000,
        sandbox_settings=WEBHOOKS[esp](url, token),
        gatherer_port=port,
        token=token,
    )
    calls = [
        json.loads(line)
        for line in (deployment.folder / "gatherer.log").read_text().splitlines()
        if '"msg":"webhook received"' in line
    ]
    assert calls, "the ESP's webhook calls reached the gatherer"
    assert sum(c["accepted"] for c in calls) > 0
    pipeline.stop()


TOKEN_ESPS = ["mailup", "deployteq"]
"""ESPs whose API takes OAuth2 access tokens that expire."""


@pytest.mark.parametrize("esp", TOKEN_ESPS)
async def test_expiring_tokens_are_renewed_through_a_broadcast(
    esp: str, deployment: Deployment, stack: ExitStack
) -> None:
    pipeline, _job, _manifest = await run_broadcast(
        stack,
        deployment,
        esp,
        f"ttl-{deployment.unique}",
        1000,
        sandbox_settings={"token_ttl_s": "1", "phase_delay_s": "1.0"},
    )
    # The broadcast went through (run_broadcast waited for every response), and the ESP issued the
    # account more tokens than the three services that call it would take without renewing one.
    assert (await pipeline.stats(esp))["tokens_issued"] > 3
    pipeline.stop()


RATE_LIMITS = {
    # esp: the sandbox flavor's settings for a limit below what the connector would send unchecked
    "mailup": {"rate_limit_per_s": "2"},
    "optimizely": {"opt_rate_per_s": "2"},
    "deployteq": {"api_limit_per_s": "1", "api_limit_burst": "1"},
}


@pytest.mark.parametrize("esp", sorted(RATE_LIMITS))
async def test_429s_are_honoured_and_nothing_is_lost(
    esp: str, deployment: Deployment, stack: ExitStack
) -> None:
    pipeline, job, _manifest = await run_broadcast(
        stack, deployment, esp, f"rate-{deployment.unique}", 500, sandbox_settings=RATE_LIMITS[esp]
    )
    stats = await pipeline.stats(esp)
    assert stats["sends_created"] == {job.job_id: 1}
    assert stats["rate_limited"] > 0, "the ESP answered 429s during the broadcast"
    pipeline.stop()
