"""The uploader's handlers: validate, apply the core rules, publish the next messages."""

from __future__ import annotations

import logging

from services.uploader import core
from shared.errors import InvalidMessageError
from shared.kafka import decode
from shared.logs import log_context
from shared.messages import BroadcastJob
from shared.service import Runtime

log = logging.getLogger(__name__)


async def handle_job(body: bytes, runtime: Runtime) -> None:
    """One broadcast job: an invalid one gets a failed status (if it has an id) and a dead letter."""
    try:
        job = decode(BroadcastJob, body)
    except InvalidMessageError as exc:
        status = core.rejected(body, str(exc))
        if status is not None:
            await runtime.publish(status)
        raise
    with log_context(job_id=job.job_id):
        await runtime.publish(core.accepted(job))
        log.info("job accepted", extra={"esp": job.esp, "account": job.account})
