"""The machine's limits, measured with the standard tools in the same run as the pipeline:
psql ``\\copy`` for the database and OpenSSH ``sftp`` for the ESP's site."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bench.generate import LIMIT_COLUMNS
from shared.infra.settings import PostgresSettings, SftpSettings


async def _run(argv: list[str], env: dict[str, str] | None = None, stdin: bytes | None = None) -> float:
    """Run a command to its end; returns its wall time in seconds (a failure raises with its output)."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await proc.communicate(stdin)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {out.decode(errors='replace')[-2000:]}")
    return seconds


def _psql(pg: PostgresSettings, command: str) -> tuple[list[str], dict[str, str]]:
    argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", pg.host, "-p", str(pg.port)]
    argv += ["-U", pg.user, "-d", pg.database, "-c", command]
    env = dict(os.environ)
    if pg.password is not None:
        env["PGPASSWORD"] = pg.password.get_secret_value()
    return argv, env


async def psql(pg: PostgresSettings, command: str) -> float:
    """One psql command (e.g. a ``\\copy``); its wall time."""
    argv, env = _psql(pg, command)
    return await _run(argv, env)


async def copy_in_limit(pg: PostgresSettings, csv_path: Path, table: str) -> float:
    """psql ``\\copy`` of the response rows into ``table`` (the shape and indexes of responses.events)."""
    cols = ", ".join(LIMIT_COLUMNS)
    return await psql(pg, f"\\copy {table} ({cols}) FROM '{csv_path}' WITH (FORMAT csv)")


async def copy_out_limit(pg: PostgresSettings, select: str, csv_path: Path) -> float:
    """psql ``\\copy (select …) to`` a local CSV file with a header row."""
    return await psql(pg, f"\\copy ({select}) TO '{csv_path}' WITH (FORMAT csv, HEADER)")


async def sftp_put(sftp: SftpSettings, local: Path, remote: str) -> float:
    """OpenSSH ``sftp put`` in batch mode with the generated client key and known_hosts."""
    if sftp.client_key_file is None:
        raise RuntimeError(
            "the sftp limit needs ESPBRIDGE_SFTP_CLIENT_KEY_FILE (OpenSSH batch mode has no password)"
        )
    argv = [
        "sftp",
        "-q",
        "-b",
        "-",
        "-P",
        str(sftp.port),
        "-i",
        str(sftp.client_key_file),
        "-o",
        f"UserKnownHostsFile={sftp.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        f"{sftp.username}@{sftp.host}",
    ]
    return await _run(argv, stdin=f'put "{local}" "{remote}"\n'.encode())
