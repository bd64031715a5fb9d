"""The loader's handlers."""

from __future__ import annotations

import logging

from services.loader import core
from shared.kafka import decode
from shared.logs import log_context
from shared.messages import ResponseEvent
from shared.service import Runtime

log = logging.getLogger(__name__)


async def handle_event(body: bytes, runtime: Runtime) -> None:
    """One response event."""
    event = decode(ResponseEvent, body)
    with log_context(broadcast_id=event.broadcast_id, source=core.source_text(event)):
        runtime.metrics.inc("events_received_total", type=event.type.value)
