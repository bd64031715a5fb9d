"""The monitor's handlers."""

from __future__ import annotations

from services.monitor import core
from shared.kafka import decode
from shared.logs import log_context
from shared.messages import ListUploaded
from shared.service import Runtime


async def handle_list(body: bytes, runtime: Runtime) -> None:
    """One uploaded list: report it queued for import."""
    upload = decode(ListUploaded, body)
    with log_context(job_id=upload.job_id):
        await runtime.publish(core.import_queued(upload))
