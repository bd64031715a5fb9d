"""The due-work loop every monitor process runs beside its subscribers.

It claims due rows of control.broadcast_work (at most ``max_in_flight`` steps at once, whatever the
partitions), runs each claimed step as a task, renews the leases of the steps in hand, and looks
for due work every ``due_poll_s`` or as soon as this process made some due. At SIGTERM it claims
nothing more, lets the steps in hand finish and gives back the leases of any cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

import asyncpg

from services.monitor.handlers import Monitor, StepRun
from shared.infra.db import broadcast_work
from shared.infra.db.broadcast_work import Next, WorkItem
from shared.infra.logs import log_context
from shared.infra.outages import backoff_s, unreachable_server
from shared.model.errors import is_transient

log = logging.getLogger(__name__)


class DueWork:
    """Claims and runs the due steps of broadcasts, for one monitor process."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._steps: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._finished = 0

    async def run(self) -> None:
        """Claim and run due steps until the service stops, then finish the steps in hand."""
        renewing = asyncio.create_task(self._renew_leases(), name="lease renewal")
        try:
            await self._claim_until_stopped()
            await self._finish_in_hand()
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

    async def _claim_until_stopped(self) -> None:
        settings = self.monitor.settings
        stopping = self.monitor.runtime.stopping
        outages = self.monitor.runtime.outages
        failures = 0
        down: str | None = None
        while not stopping.is_set():
            free = settings.max_in_flight - len(self._steps)
            wait_s = settings.due_poll_s
            if free > 0:
                try:
                    async with self.monitor.pool.acquire() as conn:
                        claimed = await broadcast_work.claim_due(conn, self.owner, settings.lease_s, free)
                except Exception as exc:
                    server = unreachable_server(exc)
                    failures += 1
                    wait_s = max(wait_s, backoff_s(failures))
                    if server is not None:
                        down = server
                        outages.failed(server, exc, wait_s, "the due work")
                    elif isinstance(exc, asyncpg.UndefinedTableError):
                        log.error(
                            "the database has no control.broadcast_work: apply the migrations "
                            "(espbridge db migrate)",
                            extra={"error": str(exc), "retry_in_s": wait_s},
                        )
                    elif is_transient(exc):
                        log.warning(
                            "claiming due work failed", extra={"error": str(exc), "retry_in_s": wait_s}
                        )
                    else:  # logged, never the end of the loop: every broadcast would wait
                        log.exception("claiming due work failed", extra={"retry_in_s": wait_s})
                else:
                    failures = 0
                    if down is not None:
                        outages.reachable(down)
                        down = None
                    for item in claimed:
                        self._start(item)
                    if len(claimed) == free:
                        wait_s = 0.0  # more may be due: claim again once a step is done
            self.monitor.runtime.metrics.set("monitor_steps_in_flight", len(self._steps))
            await self._pause(wait_s)

    async def _pause(self, wait_s: float) -> None:
        """Wait ``wait_s`` (0: until a step is done), less if work is made due here or the service stops."""
        due = self.monitor.due
        stopping = self.monitor.runtime.stopping
        waits = [asyncio.ensure_future(due.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=wait_s or None, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        due.clear()

    def _start(self, item: WorkItem) -> None:
        task = asyncio.create_task(self._run_step(item), name=f"{item.step} {item.job_id}")
        self._steps[item.lease] = task

        def done(_: asyncio.Task[None]) -> None:
            self._steps.pop(item.lease, None)
            self._finished += 1
            self.monitor.due.set()  # a place is free: claim again

        task.add_done_callback(done)

    async def _run_step(self, item: WorkItem) -> None:
        """Run one claimed step and write what comes next (the lease is released with it)."""
        monitor = self.monitor
        with log_context(job_id=item.job_id, step=item.step.value):
            run = StepRun(item, monitor)
            after: Next | None
            try:
                after = await run.run()
            except Exception as exc:
                after = await run.failed(exc)
            monitor.runtime.metrics.inc("monitor_steps_total", step=item.step.value)
            if after is None:
                return
            try:
                async with monitor.pool.acquire() as conn:
                    kept = await broadcast_work.finish(conn, item.lease, after)
            except Exception as exc:
                log.warning(
                    "the step's outcome could not be written: the step runs again when its lease runs out",
                    extra={"error": str(exc)[:500], "error_class": type(exc).__name__},
                )
                return
            if not kept:
                log.info("the broadcast was cancelled or taken over during the step: its outcome is dropped")

    async def _renew_leases(self) -> None:
        """Keep the leases of the steps in hand, every third of the lease."""
        settings = self.monitor.settings
        while True:
            await asyncio.sleep(settings.lease_s / 3)
            leases = list(self._steps)
            if not leases:
                continue
            try:
                async with self.monitor.pool.acquire() as conn:
                    kept = await broadcast_work.renew(conn, leases, settings.lease_s)
            except Exception as exc:
                log.warning("leases not renewed", extra={"error": str(exc)[:500], "steps": len(leases)})
                continue
            if len(kept) < len(leases):
                log.warning(
                    "steps lost their leases (cancelled or taken over)",
                    extra={"lost": len(leases) - len(kept)},
                )

    async def _finish_in_hand(self) -> None:
        """At stop: let the steps in hand finish, for most of the shutdown grace; give back the rest."""
        in_hand = len(self._steps)
        finished_before = self._finished
        leases: list[uuid.UUID] = []
        if self._steps:
            grace = self.monitor.settings.shutdown_timeout_s * 0.8
            _, late = await asyncio.wait(list(self._steps.values()), timeout=grace)
            leases = [lease for lease, task in self._steps.items() if task in late]
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        handed_back = 0
        if leases:
            with contextlib.suppress(Exception):
                async with self.monitor.pool.acquire() as conn:
                    handed_back = await broadcast_work.release(conn, leases)
        log.info(
            "due work stopped: the steps in hand finished",
            extra={
                "in_hand": in_hand,
                "finished": self._finished - finished_before,
                "handed_back": handed_back,
            },
        )
