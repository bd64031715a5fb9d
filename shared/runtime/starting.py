"""A service process's first step: SIGTERM while it starts exits 0 at once.

A supervisor (systemd, Kubernetes, ``make demo-stop``) may stop a service before it is running:
while Python imports its modules (a second or more), reads its settings, waits for Kafka or opens
its pools. No message has been taken yet, so there is nothing to finish; the process stops with
exit code 0 rather than being killed by the signal. Each service's ``__main__`` is
:func:`start`: it installs that handler, and only then imports the service's modules (by name,
so that nothing heavy is imported before); once the event loop runs,
:func:`shared.runtime.run.run_service` cancels the start-up instead (closing what it opened), and
once the app runs, SIGTERM is the graceful stop of in-flight messages.

This module imports nothing but the standard library, so that it can be the first import.
"""

from __future__ import annotations

import importlib
import signal
from collections.abc import Sequence
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def exit_on_sigterm() -> None:
    """Until the service's own handling takes over, SIGTERM ends the process with exit code 0."""
    signal.signal(signal.SIGTERM, _exit)


def start(app_module: str, argv: Sequence[str] | None = None) -> int:
    """Run the service whose ``SERVICE`` spec is in ``app_module`` (``services.<name>.app``);
    returns the process's exit code."""
    exit_on_sigterm()
    app = importlib.import_module(app_module)  # the heavy imports, after the handler is in place
    entry = importlib.import_module("shared.runtime.main")
    return int(entry.service_main(app.SERVICE, argv))
