"""The gatherer's handlers."""

from __future__ import annotations

import logging

from services.gatherer import core
from shared.kafka import decode
from shared.logs import log_context
from shared.messages import ResponseFile
from shared.service import Runtime

log = logging.getLogger(__name__)


async def handle_file(body: bytes, runtime: Runtime) -> None:
    """One remote response file to gather."""
    file = decode(ResponseFile, body)
    with log_context(file=core.file_key(file)):
        runtime.metrics.inc("files_received_total", esp=file.esp)
        log.info("response file received")
