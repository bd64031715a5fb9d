"""Optimizely bounces beyond one page of ``GET /responses``, through the whole pipeline.

The sandbox's ``/responses`` answers as documented (no ``offset``; 400 for one), and the account
takes a page of a few bounces, so the gatherer must read the mailing's bounces again recipient by
recipient, over the batch's recipient list, to load them all.
"""

from __future__ import annotations

from contextlib import ExitStack

from shared.infra.db import connect
from tests.fixtures.deployment import Deployment
from tests.integration.test_esps_end_to_end import run_broadcast

RESPONSES_LIMIT = 5
"""The account's page of ``GET /responses``: far fewer than the broadcast's bounces."""
BOUNCES = ("bounce_hard", "bounce_soft")


async def test_bounces_beyond_one_page_are_read_by_recipients_and_each_loaded_once(
    deployment: Deployment,
) -> None:
    with ExitStack() as processes:
        pipeline, job, manifest = await run_broadcast(
            processes,
            deployment,
            "optimizely",
            f"paged-{deployment.unique}",
            1000,
            # Every bounce and unsubscribe is the API's (the rest comes in files).
            sandbox_settings={
                "opt_source_weights": "api=1",
                "rate_hard_bounce": "0.05",
                "rate_soft_bounce": "0.03",
            },
            account_options={"responses_limit": RESPONSES_LIMIT, "page_size": 200},
        )
        pipeline.stop()
    # run_broadcast waited until the loaded counts equal the sandbox's own, type by type.
    by_api = manifest["by_source"]["api"]
    assert all(by_api[t] == manifest["counts"][t] > RESPONSES_LIMIT for t in BOUNCES), by_api
    conn = await connect(deployment.database)
    try:
        rows = await conn.fetch(
            "SELECT type, count(*) AS n, count(DISTINCT communication_key) AS recipients,"
            " count(*) FILTER (WHERE source LIKE '%recipientIds%') AS narrowed"
            " FROM responses.events WHERE broadcast_id = $1 AND type = ANY($2::text[]) GROUP BY type",
            job.job_id,
            list(BOUNCES),
        )
    finally:
        await conn.close()
    loaded = {r["type"]: (r["n"], r["recipients"]) for r in rows}
    assert loaded == {t: (manifest["counts"][t], manifest["counts"][t]) for t in BOUNCES}, "each once"
    # Those beyond the mailing's first page could only come from the requests by recipientIds.
    assert all(r["narrowed"] >= r["n"] - RESPONSES_LIMIT for r in rows)
