"""Work a service runs beside its subscribers: started when the service is ready, told to stop by
the runtime's ``stopping``, waited for at the stop, and cut off at the end of the shutdown grace."""

from __future__ import annotations

import asyncio

import pytest

from shared.runtime.runtime import Runtime
from shared.runtime.settings import ServiceSettings


async def test_background_work_runs_until_stopping_and_the_stop_waits_for_it() -> None:
    runtime = Runtime("test", ServiceSettings(shutdown_timeout_s=30))
    steps: list[str] = []

    async def work() -> None:
        steps.append("started")
        await runtime.stopping.wait()
        await asyncio.sleep(0)  # the step in hand, finished after the stop began
        steps.append("finished")

    runtime.run_in_background("work", work)
    assert steps == [], "nothing runs before the service is ready"
    runtime.start_background()
    await asyncio.sleep(0)
    assert steps == ["started"]
    runtime.stopping.set()
    await runtime.stop_background()
    assert steps == ["started", "finished"]


async def test_background_work_that_does_not_stop_is_cut_off_at_the_end_of_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = Runtime("test", ServiceSettings(shutdown_timeout_s=0.05))
    cancelled = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runtime.run_in_background("stubborn", stubborn)
    runtime.start_background()
    runtime.stopping.set()
    await runtime.stop_background()
    assert cancelled.is_set()
    assert "background work cut off at the end of the shutdown grace" in caplog.messages
