"""Running a service: wait for Kafka, open what ``create_app`` asks for, run until SIGTERM.

SIGTERM and SIGINT stop the consumers, let in-flight messages finish (long work that polls hands
its message back instead) and background work return, close every resource in reverse, and the
process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from typing import Any

from shared.infra.kafka import ensure_topics, kafka_answers
from shared.infra.outages import unreachable_server
from shared.infra.settings import KafkaSettings
from shared.model.errors import UnavailableError
from shared.runtime.runtime import AppFactory, Runtime
from shared.runtime.settings import ServiceSettings
from shared.runtime.watches import KafkaWatch

log = logging.getLogger(__name__)


async def wait_for_kafka(settings: KafkaSettings, timeout_s: float) -> None:
    """Create the topics, retrying with bounded backoff until Kafka answers or time runs out."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            await ensure_topics(settings)
            return
        except UnavailableError as exc:
            if time.monotonic() + delay > deadline:
                raise UnavailableError(f"Kafka not available after {timeout_s:.0f}s: {exc}") from exc
            log.warning("Kafka not available yet, retrying", extra={"error": str(exc), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def watch_outages(runtime: Runtime) -> None:
    """Clear log lines for outages of Kafka (and of PostgreSQL, see :meth:`Runtime.open_pool`), for
    as long as the runtime's stack is open."""
    runtime.watch(KafkaWatch(functools.partial(kafka_answers, runtime.settings.kafka), runtime.outages))
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def lost_in_outage(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A client library's helper task that failed with its connection (asyncssh's parallel
        # reads) is never awaited once the caller has the error: the outage lines say it already.
        exc = context.get("exception")
        if isinstance(exc, BaseException) and unreachable_server(exc) is not None:
            log.debug("a client task ended with its connection", extra={"error": repr(exc)})
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(lost_in_outage)

    async def restore() -> None:
        loop.set_exception_handler(previous)

    runtime.stack.push_async_callback(restore)


async def run_service(name: str, settings: ServiceSettings, create_app: AppFactory) -> None:
    """Run a service until SIGTERM/SIGINT.

    A SIGTERM before the app runs (while it waits for Kafka or opens its pools) cancels the
    start-up: what was opened is closed and the service returns, as there is no message in hand.
    Once the app runs, SIGTERM is its graceful stop (faststream's handler replaces this one).
    """
    runtime = Runtime(name, settings)
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    assert starting is not None  # run_service runs as a task (asyncio.run)
    stopped_while_starting = False

    def stop_starting() -> None:
        nonlocal stopped_while_starting
        stopped_while_starting = True
        starting.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop_starting)
    try:
        async with runtime.stack as stack:
            watch_outages(runtime)
            await wait_for_kafka(settings.kafka, settings.startup_timeout_s)
            app = await create_app(settings, runtime)
            if settings.http.enabled:  # after create_app: a service may have added routes (webhooks)
                await runtime.http.start()
                stack.push_async_callback(runtime.http.stop)

            async def mark_ready() -> None:
                runtime.ready = True
                runtime.start_background()
                log.info("service ready", extra={"group_id": settings.group_id(name)})

            async def mark_stopping() -> None:
                runtime.ready = False
                runtime.stopping.set()
                log.info("stopping: finishing in-flight messages")
                await runtime.stop_background()

            app.after_startup(mark_ready)
            app.on_shutdown(mark_stopping)
            await app.run(log_level=logging.DEBUG)  # its SIGTERM handler replaces stop_starting
    except asyncio.CancelledError:
        if not stopped_while_starting:
            raise
        log.info("stopped while starting (SIGTERM before the service was ready)")
        return
    log.info("stopped")
