"""SIGTERM while a service process starts: it exits 0 at once.

A supervisor (systemd, Kubernetes, ``make demo-stop``) may stop a service before it is running:
while Python imports its modules (a second or more), reads its settings, waits for Kafka or opens
its pools. No message has been taken yet, so there is nothing to finish; the process stops with
exit code 0 rather than being killed by the signal. Each service's ``__main__`` calls
:func:`exit_on_sigterm` before importing anything heavy; once the event loop runs,
:func:`shared.service.run_service` cancels the start-up instead (closing what it opened), and once
the app runs, SIGTERM is the graceful stop of in-flight messages.

This module imports nothing but the standard library, so that it can be the first import.
"""

from __future__ import annotations

import signal
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def exit_on_sigterm() -> None:
    """Until the service's own handling takes over, SIGTERM ends the process with exit code 0."""
    signal.signal(signal.SIGTERM, _exit)
