"""Failpoints: named places in the services where a fault test can stop a process at an exact point.

A point is armed by naming it in ``ESPBRIDGE_FAILPOINTS`` (comma list) with
``ESPBRIDGE_FAILPOINT_DIR`` set. The first time an armed point is reached, the process writes the
marker file ``<dir>/<point>`` (atomically) and holds there until it receives SIGUSR1. A test waits
for the marker, then kills the process (``kill -9``) or sends SIGTERM, and may release it
(SIGUSR1). A point whose marker already exists (an earlier process stopped there) is passed, so a
restarted process with the same settings goes on. Points that are not armed cost a set lookup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)


class Point(StrEnum):
    """The failpoints placed in the services."""

    UPLOADER_MID_UPLOAD = "uploader.mid_upload"
    """Part of the list file is written to the temporary remote file; not renamed yet."""
    MONITOR_BEFORE_SEND = "monitor.before_send"
    """"Send requested" is recorded in control.jobs; the send call is not made yet."""
    MONITOR_AFTER_SEND = "monitor.after_send"
    """The ESP accepted the send; its id is not recorded and the list's offset not committed."""
    GATHERER_MID_FILE = "gatherer.mid_file"
    """Some events of a response file are published; the file is not archived yet."""
    LOADER_AFTER_DB_COMMIT = "loader.after_db_commit"
    """A batch is committed to the database; its Kafka offsets are not committed yet."""


class FailpointSettings(BaseSettings):
    """Which failpoints are armed (none in production) and where their markers go."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_", frozen=True, extra="ignore")

    failpoints: Annotated[frozenset[Point], NoDecode] = Field(
        default=frozenset(), description="comma list of failpoints to hold at (fault tests only)"
    )
    failpoint_dir: Path | None = Field(default=None, description="where failpoint markers are written")

    @field_validator("failpoints", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _needs_dir(self) -> Self:
        if self.failpoints and self.failpoint_dir is None:
            raise ValueError("ESPBRIDGE_FAILPOINTS needs ESPBRIDGE_FAILPOINT_DIR")
        return self


class Failpoints:
    """The armed failpoints of one process."""

    def __init__(self, settings: FailpointSettings) -> None:
        self._armed = settings.failpoints
        self._dir = settings.failpoint_dir
        self._holding: set[Point] = set()
        self._released: asyncio.Event | None = None

    async def reach(self, point: Point) -> None:
        """Hold here if ``point`` is armed and no earlier process stopped at it; else return at once."""
        if point not in self._armed or self._dir is None:
            return
        marker = self._dir / point.value
        if point not in self._holding:
            if marker.exists():
                return
            self._holding.add(point)
            if self._released is None:
                self._released = asyncio.Event()
                asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._released.set)
            _write_atomic(marker, f"{os.getpid()}\n".encode())  # the handler is in place first
            log.warning("failpoint reached, holding until SIGUSR1", extra={"failpoint": point.value})
        assert self._released is not None
        await self._released.wait()
        log.warning("failpoint released", extra={"failpoint": point.value})


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
