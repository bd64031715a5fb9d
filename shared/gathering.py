"""Finding response files: list each account's response folders, record new files in the ledger
(control.gathered_files), and publish one ResponseFile per new file for the gatherer workers.

Used by every gatherer process on its interval and by ``espbridge gather now``; the ledger's
unique key makes concurrent scans publish each file once. A file recorded but not yet taken by a
worker after ``republish_after_s`` is published again (its first message may have been lost).
"""

from __future__ import annotations

import fnmatch
import logging
import posixpath
from datetime import UTC, datetime

import aiohttp
import asyncpg
from faststream.kafka import KafkaBroker

from shared.esp import Accounts, ConnectorContext, connector_for
from shared.kafka import publish_many
from shared.messages import ResponseFile
from shared.settings import KafkaSettings
from shared.sftp import SftpPool, list_files

log = logging.getLogger(__name__)


async def scan(
    accounts: Accounts,
    sftp: SftpPool,
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    broker: KafkaBroker,
    kafka: KafkaSettings,
    republish_after_s: float = 300.0,
) -> list[ResponseFile]:
    """One scan of every configured account; returns the files it published."""
    found: list[ResponseFile] = []
    for account in accounts.all():
        connector = connector_for(account, ConnectorContext(http, sftp))
        async with sftp.session() as session:
            for source in connector.response_sources:
                folder = posixpath.join(account.sftp_root, source.folder)
                for remote in await list_files(session, folder):
                    if not fnmatch.fnmatch(posixpath.basename(remote.path), source.pattern):
                        continue
                    found.append(
                        ResponseFile(
                            esp=account.esp,
                            account=account.account,
                            path=remote.path,
                            size=remote.size,
                            mtime=datetime.fromtimestamp(remote.mtime, UTC),
                        )
                    )
    to_publish: list[ResponseFile] = []
    async with pool.acquire() as conn:
        for file in found:
            is_new = await conn.fetchval(
                """
                INSERT INTO control.gathered_files (esp, account, path, size, mtime)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (esp, account, path, size, mtime) DO UPDATE
                    SET found_at = now()
                    WHERE gathered_files.state = 'found'
                      AND gathered_files.found_at < now() - make_interval(secs => $6)
                RETURNING true
                """,
                file.esp,
                file.account,
                file.path,
                file.size,
                file.mtime,
                republish_after_s,
            )
            if is_new:
                to_publish.append(file)
    await publish_many(broker, kafka, to_publish)
    if to_publish:
        log.info("response files found", extra={"files": len(to_publish)})
    return to_publish
