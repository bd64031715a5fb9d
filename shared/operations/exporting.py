"""The unsubscriber export (MailUp's unsubscriber flow back to the CRM): the contacts the ESPs
unsubscribed or removed, as a ``;``-separated UTF-8 file in a CRM-side folder, filtered by list,
day and reason; written by ``espbridge subscriptions export`` or on a schedule in the syncer.

A file appears whole or not at all (a hidden temporary name, renamed when complete). On a schedule
each period's file is written once, however many syncers run: the period's advisory lock in the
CRM database, then the file (or the record that it was written, kept in ``.espbridge-written/``
beside it, since the CRM may take the file away) says whether it is still to be written.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from croniter import croniter
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.infra.db.core import Conn
from shared.infra.db.unsubscribers import (
    EVERY,
    ListPattern,
    Unsubscriber,
    UnsubscriberFilter,
    lock_period,
    unsubscribers,
)
from shared.infra.outages import backoff_s, unreachable_server
from shared.model.errors import ConfigurationError
from shared.model.messages import ListId, Name, utcnow
from shared.runtime.runtime import Runtime

log = logging.getLogger(__name__)

HEADER = ("email", "esp", "account", "list", "state", "reason", "source", "changed_at")
"""The export file's header line (its columns, in order)."""
DELIMITER = ";"
WRITTEN = ".espbridge-written"
"""The folder beside the exports that records each file written (so a file the CRM took away is
not written again); the newest :data:`KEEP_WRITTEN` records are kept."""
KEEP_WRITTEN = 100


class Period(StrEnum):
    """Which changes an export holds."""

    ALL = "all"
    """Every unsubscriber; the file is named by the time of the export."""
    PREVIOUS_DAY = "previous-day"
    """The unsubscribers of the day before the export's, in the export's time zone."""


@dataclass(frozen=True, slots=True)
class PeriodFile:
    """The file of one period: its name and the changes it holds."""

    name: str
    changed_from: datetime | None
    changed_before: datetime | None


def period_file(period: Period, at: datetime, zone: ZoneInfo) -> PeriodFile:
    """The file of the export made at ``at``: ``unsubscribers_all_<UTC time>.csv``, or
    ``unsubscribers_<day>.csv`` for the day before ``at``'s day in ``zone`` (its own length, DST
    included)."""
    if period is Period.ALL:
        return PeriodFile(f"unsubscribers_all_{at.astimezone(UTC):%Y%m%dT%H%M%SZ}.csv", None, None)
    day = at.astimezone(zone).date() - timedelta(days=1)
    start, end = (
        datetime.combine(d, time(), tzinfo=zone).astimezone(UTC) for d in (day, day + timedelta(days=1))
    )
    return PeriodFile(f"unsubscribers_{day.isoformat()}.csv", start, end)


_NAME = TypeAdapter(Name)
_LIST = TypeAdapter(ListId)


def parse_list_pattern(text: str) -> ListPattern:
    """``esp/account/list`` or ``esp/account/*`` as a list filter (ValueError says what is wrong)."""
    parts = text.strip().split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"list filter {text!r} is not esp/account/list or esp/account/*")
    esp, account, list_id = parts
    try:
        _NAME.validate_python(esp)
        _NAME.validate_python(account)
        if list_id != EVERY:
            _LIST.validate_python(list_id)
    except ValidationError:
        raise ValueError(
            f"list filter {text!r}: the ESP and account are lower-case names, the list an ESP list id or *"
        ) from None
    return ListPattern(esp, account, list_id)


def parse_zone(name: str) -> ZoneInfo:
    """An IANA time zone (ValueError for an unknown one)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Rome, or UTC)") from None


@dataclass(frozen=True, slots=True)
class Export:
    """What an export writes and where: the CRM-side folder, the period, its time zone, the filters."""

    folder: Path
    period: Period = Period.ALL
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    include_lists: tuple[ListPattern, ...] = ()
    exclude_lists: tuple[ListPattern, ...] = ()
    include_reasons: tuple[str, ...] = ()
    exclude_reasons: tuple[str, ...] = ()

    def selection(self, file: PeriodFile) -> UnsubscriberFilter:
        """The rows of ``file``."""
        return UnsubscriberFilter(
            include_lists=self.include_lists,
            exclude_lists=self.exclude_lists,
            include_reasons=self.include_reasons,
            exclude_reasons=self.exclude_reasons,
            changed_from=file.changed_from,
            changed_before=file.changed_before,
        )


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    """What one export did."""

    path: Path
    rows: int
    """The unsubscribers in the file (0 when it was not written by this export)."""
    written: bool
    """False: the period's file had been written already (a scheduled export only)."""
    replaced: bool = False
    """An earlier file of the same name was replaced (an export by hand)."""


def check_folder(folder: Path) -> None:
    """A folder an export can write into, or a one-line :class:`ConfigurationError`."""
    if not folder.exists():
        raise ConfigurationError(f"the export folder {folder} does not exist")
    if not folder.is_dir():
        raise ConfigurationError(f"the export folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigurationError(f"the export folder {folder} is not writable")


class _CsvFile:
    """The export file, written under a hidden temporary name and renamed into place when complete
    (blocking calls: run them in a thread)."""

    def __init__(self, path: Path, zone: ZoneInfo) -> None:
        self.path = path
        self.zone = zone
        self.temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            self._out = self.temp.open("x", encoding="utf-8", newline="")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot write into the export folder {path.parent}: {exc.strerror}"
            ) from None
        self._csv = csv.writer(self._out, delimiter=DELIMITER, lineterminator="\n")
        self._csv.writerow(HEADER)

    def write(self, rows: Iterable[Unsubscriber]) -> None:
        self._csv.writerows(
            (
                r.email,
                r.esp,
                r.account,
                r.list,
                r.state,
                r.reason,
                r.source,
                r.changed_at.astimezone(self.zone).isoformat(timespec="milliseconds"),
            )
            for r in rows
        )

    def commit(self) -> bool:
        """Make the file durable and give it its name; whether it replaced one."""
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        replaced = self.path.exists()
        os.replace(self.temp, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a crash
        finally:
            os.close(folder)
        return replaced

    def discard(self) -> None:
        self._out.close()
        self.temp.unlink(missing_ok=True)


def already_written(folder: Path, name: str) -> bool:
    """Whether the period's file is there, or was written and taken away."""
    return (folder / name).exists() or (folder / WRITTEN / name).exists()


def _record_written(folder: Path, name: str) -> None:
    records = folder / WRITTEN
    try:
        records.mkdir(exist_ok=True)
        (records / name).touch()
        kept = sorted(records.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEEP_WRITTEN:]:
            old.unlink(missing_ok=True)
    except OSError as exc:  # the file itself is there, which says the same while it stays
        log.warning("could not record the export as written", extra={"file": name, "error": str(exc)})


async def export_unsubscribers(
    conn: Conn, export: Export, at: datetime, *, once: bool = False, chunk: int = 2000
) -> ExportOutcome:
    """Write the unsubscriber file of the export made at ``at`` into ``export.folder``, streamed
    from the CRM. ``once``: a period's file already written is left alone (a scheduled export);
    otherwise it is replaced (an export by hand)."""
    check_folder(export.folder)
    file = period_file(export.period, at, export.zone)
    path = export.folder / file.name
    async with conn.transaction(readonly=True):
        await lock_period(conn, file.name)
        if once and await asyncio.to_thread(already_written, export.folder, file.name):
            return ExportOutcome(path, 0, written=False)
        out = await asyncio.to_thread(_CsvFile, path, export.zone)
        rows = 0
        try:
            async for batch in unsubscribers(conn, export.selection(file), chunk):
                await asyncio.to_thread(out.write, batch)
                rows += len(batch)
            replaced = await asyncio.to_thread(out.commit)
        except BaseException:
            await asyncio.to_thread(out.discard)
            raise
        # recorded before the lock is let go: the next exporter sees the record even if the CRM
        # has taken the file already
        await asyncio.to_thread(_record_written, export.folder, file.name)
    return ExportOutcome(path, rows, written=True, replaced=replaced)


def _comma_separated(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class ExportSettings(BaseSettings):
    """The syncer's scheduled unsubscriber export (``ESPBRIDGE_SYNCER_EXPORT_*``): on when both the
    schedule and the folder are set. Lists and reasons are comma-separated."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_SYNCER_EXPORT_", frozen=True, extra="ignore")

    schedule: str | None = Field(
        default=None, description="a cron expression, in the time zone below (e.g. '0 6 * * *': 06:00)"
    )
    dir: Path | None = Field(default=None, description="the CRM-side folder the files are written into")
    period: Period = Field(default=Period.PREVIOUS_DAY, description="all, or previous-day")
    time_zone: str = Field(default="UTC", description="the schedule's, the day's and the times' zone")
    include_lists: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="esp/account/list or esp/account/* (none: every list)"
    )
    exclude_lists: Annotated[tuple[str, ...], NoDecode] = ()
    include_reasons: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="unsubscribe, complaint, bounce_hard, … (none: every reason)"
    )
    exclude_reasons: Annotated[tuple[str, ...], NoDecode] = ()

    _split = field_validator(
        "include_lists", "exclude_lists", "include_reasons", "exclude_reasons", mode="before"
    )(_comma_separated)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression (minute hour day month weekday)")
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        parse_zone(value)
        return value

    @field_validator("include_lists", "exclude_lists")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            parse_list_pattern(text)
        return value

    @model_validator(mode="after")
    def _both_or_neither(self) -> ExportSettings:
        if (self.schedule is None) != (self.dir is None):
            raise ValueError(
                "the scheduled export needs both ESPBRIDGE_SYNCER_EXPORT_SCHEDULE and "
                "ESPBRIDGE_SYNCER_EXPORT_DIR (or neither)"
            )
        return self

    @property
    def enabled(self) -> bool:
        """Whether exports are scheduled."""
        return self.schedule is not None and self.dir is not None

    def export(self) -> Export:
        """The export these settings describe (their folder must be set)."""
        assert self.dir is not None
        return Export(
            folder=self.dir,
            period=self.period,
            zone=parse_zone(self.time_zone),
            include_lists=tuple(parse_list_pattern(t) for t in self.include_lists),
            exclude_lists=tuple(parse_list_pattern(t) for t in self.exclude_lists),
            include_reasons=self.include_reasons,
            exclude_reasons=self.exclude_reasons,
        )


class ScheduledExport:
    """The export on its schedule, for one process (every syncer runs one; each period's file is
    written once). At start it writes the file of the latest scheduled time if nobody did (a
    syncer down at that time); an export that fails is retried until it is written."""

    def __init__(
        self,
        runtime: Runtime,
        crm: asyncpg.Pool,
        settings: ExportSettings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        assert settings.schedule is not None
        self.runtime = runtime
        self.crm = crm
        self.schedule = settings.schedule
        self.export = settings.export()
        self.clock = clock

    def _after(self, moment: datetime) -> datetime:
        ticks = croniter(self.schedule, moment.astimezone(self.export.zone))
        return ticks.get_next(datetime).astimezone(UTC)

    def _latest(self, now: datetime) -> datetime:
        ticks = croniter(self.schedule, now.astimezone(self.export.zone))
        return ticks.get_prev(datetime).astimezone(UTC)

    async def run(self) -> None:
        """Write each scheduled period's file until the service stops."""
        tick = self._latest(self.clock())
        while await self._write(tick):
            upcoming = self._after(tick)
            now = self.clock()
            if upcoming <= now:  # a retry outlasted the schedule: on with the latest time
                upcoming = max(upcoming, self._latest(now))
            if not await self._wait_until(upcoming):
                return
            tick = upcoming

    async def _wait_until(self, moment: datetime) -> bool:
        """False if the service began to stop first."""
        while (left := (moment - self.clock()).total_seconds()) > 0:
            if not await self._pause(left):
                return False
        return not self.runtime.stopping.is_set()

    async def _pause(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.runtime.stopping.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _write(self, tick: datetime) -> bool:
        """Write the file of ``tick`` unless written; False if the service began to stop first."""
        failures = 0
        down: str | None = None
        while not self.runtime.stopping.is_set():
            try:
                async with self.crm.acquire() as conn:
                    outcome = await export_unsubscribers(conn, self.export, tick, once=True)
            except Exception as exc:
                failures += 1
                wait_s = backoff_s(failures, high=300.0)
                server = unreachable_server(exc)
                if server is not None:
                    down = server
                    self.runtime.outages.failed(server, exc, wait_s, "the unsubscriber export")
                elif isinstance(exc, ConfigurationError):
                    log.error("unsubscriber export failed: %s", exc, extra={"retry_in_s": wait_s})
                else:
                    log.exception("unsubscriber export failed", extra={"retry_in_s": wait_s})
                if not await self._pause(wait_s):
                    return False
                continue
            if down is not None:
                self.runtime.outages.reachable(down)
            done = "written" if outcome.written else "already_written"
            self.runtime.metrics.inc("unsubscriber_exports_total", outcome=done)
            log.info(
                "unsubscriber export %s",
                "written" if outcome.written else "already written",
                extra={"file": str(outcome.path), "rows": outcome.rows, "scheduled_at": tick.isoformat()},
            )
            return True
        return False


def schedule_unsubscriber_export(
    runtime: Runtime, crm: asyncpg.Pool, settings: ExportSettings | None = None
) -> bool:
    """Run the scheduled unsubscriber export beside the service's subscribers when
    ``ESPBRIDGE_SYNCER_EXPORT_SCHEDULE`` and ``_DIR`` are set (``crm``: the CRM's pool); whether
    it runs. Bad settings raise at once."""
    settings = settings if settings is not None else ExportSettings()
    if not settings.enabled:
        return False
    runtime.run_in_background("unsubscriber export", ScheduledExport(runtime, crm, settings).run)
    return True
