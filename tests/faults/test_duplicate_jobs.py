"""The same job published twice, once while it runs and once after it is done: still one list,
one import and one send, and every response event loaded once."""

from __future__ import annotations

from contextlib import ExitStack

from shared.model.topics import Topic
from shared.operations.jobs import publish_job
from tests.fixtures.deployment import Deployment
from tests.fixtures.faults import assert_exactly_once, fault_pipeline
from tests.fixtures.kafka import committed
from tests.fixtures.pipeline import seed_list
from tests.fixtures.processes import log_messages
from tests.fixtures.waits import wait_for


async def test_a_job_published_twice_is_uploaded_sent_and_loaded_once(deployment: Deployment) -> None:
    kafka = deployment.kafka
    expected_rows = await seed_list(deployment, 1500)
    with ExitStack() as stack:
        pipeline = fault_pipeline(stack, deployment)
        job = await pipeline.publish("sandbox", f"twice-{deployment.unique}")
        await publish_job(kafka, job)  # again at once, while the first is in progress
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)

        # Once more after the broadcast is done: handled, and nothing happens again.
        await publish_job(kafka, job)

        async def all_three_handled() -> bool:
            return await committed(kafka, "uploader", Topic.BROADCAST_JOBS) == 3

        await wait_for(all_three_handled, timeout_s=60, what="the uploader through all three copies")
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)
        pipeline.stop()
    duplicates = log_messages(deployment.folder / "uploader.log").count(
        "job already uploaded, the duplicate is ignored"
    )
    assert duplicates == 2
