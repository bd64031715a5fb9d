"""control.gathered_files: the ledger of remote response files, each gathered once.

A file is identified by its account, path, size and modification time, so a file written again
under the same name is gathered again. States: ``found`` (announced by a scan), ``processing`` (a
gatherer took it), ``archived`` (its events are published and it is in the ESP's archive folder),
``failed`` (reported, never read: a hidden file left on the ESP's site; ``error`` says why).
"""

from __future__ import annotations

from datetime import datetime

from shared.infra.db.core import Conn
from shared.model.messages import ResponseFile


def _key(file: ResponseFile) -> tuple[str, str, str, int, datetime]:
    """The ledger's unique key of a file, the first five parameters of each statement."""
    return file.esp, file.account, file.path, file.size, file.mtime


async def record_found(conn: Conn, file: ResponseFile, republish_after_s: float) -> bool:
    """Record a file a scan found; True if it is to be announced: new, or found before and not
    taken by a gatherer within ``republish_after_s`` (its announcement may have been lost)."""
    announce = await conn.fetchval(
        """
        INSERT INTO control.gathered_files (esp, account, path, size, mtime)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (esp, account, path, size, mtime) DO UPDATE
            SET found_at = now()
            WHERE gathered_files.state = 'found'
              AND gathered_files.found_at < now() - make_interval(secs => $6)
        RETURNING true
        """,
        *_key(file),
        republish_after_s,
    )
    return bool(announce)


async def record_unread(conn: Conn, file: ResponseFile, reason: str) -> bool:
    """Record a file that is reported instead of gathered (state ``failed``, ``reason`` its error);
    True only the first time, so each version of it is reported once across scans, processes and
    restarts."""
    first = await conn.fetchval(
        """
        INSERT INTO control.gathered_files (esp, account, path, size, mtime, state, error, finished_at)
        VALUES ($1, $2, $3, $4, $5, 'failed', $6, now())
        ON CONFLICT (esp, account, path, size, mtime) DO NOTHING
        RETURNING true
        """,
        *_key(file),
        reason,
    )
    return bool(first)


async def take(conn: Conn, file: ResponseFile) -> bool:
    """A gatherer takes a file (counting the attempt); False if it was archived before."""
    state = await conn.fetchval(
        """
        INSERT INTO control.gathered_files
            (esp, account, path, size, mtime, state, attempts, started_at)
        VALUES ($1, $2, $3, $4, $5, 'processing', 1, now())
        ON CONFLICT (esp, account, path, size, mtime) DO UPDATE
        SET state = CASE WHEN gathered_files.state = 'archived' THEN 'archived' ELSE 'processing' END,
            attempts = gathered_files.attempts + 1,
            started_at = now()
        RETURNING state
        """,
        *_key(file),
    )
    return str(state) != "archived"


async def archived(
    conn: Conn, file: ResponseFile, archive: str, events: int | None, bad_rows: int | None
) -> None:
    """The file's events are published and it is archived at ``archive`` (counts None: unknown,
    an earlier attempt archived it)."""
    await conn.execute(
        """
        UPDATE control.gathered_files
        SET state = 'archived', archived_to = $6, finished_at = now(),
            events = coalesce($7, events), bad_rows = coalesce($8, bad_rows), error = NULL
        WHERE esp = $1 AND account = $2 AND path = $3 AND size = $4 AND mtime = $5
        """,
        *_key(file),
        archive,
        events,
        bad_rows,
    )
