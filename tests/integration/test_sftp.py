"""SFTP against the real OpenSSH sshd: atomic uploads, streaming downloads, pinned host keys."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from shared.infra.sftp import (
    SftpPool,
    download_stream,
    is_partial_upload,
    list_files,
    list_folder,
    remove_if_present,
    upload_file_atomic,
    upload_stream_atomic,
)
from shared.model.errors import ConfigurationError, HostKeyError
from tests.fixtures.servers import Servers

CHUNK = 256 * 1024
CHUNKS = 96  # 24 MiB


def payload(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (CHUNK // 32)


async def chunks(n: int = CHUNKS) -> AsyncIterator[bytes]:
    for i in range(n):
        yield payload(i)
        await asyncio.sleep(0)  # let the concurrent reader run between writes


async def test_upload_is_never_seen_half_written(servers: Servers, sftp_folder: tuple[str, Path]) -> None:
    remote, local = sftp_folder
    target = f"{remote}/list.csv"
    full = b"".join(payload(i) for i in range(CHUNKS))
    want = hashlib.sha256(full).hexdigest()
    writer_pool, reader_pool = SftpPool(servers.sftp), SftpPool(servers.sftp)
    observations: list[tuple[str, int, str | None]] = []
    hidden_seen: set[bytes] = set()
    upload_done = asyncio.Event()

    async def reader() -> None:
        async with reader_pool.session() as sftp:
            while not upload_done.is_set():
                listing = await list_folder(sftp, remote)
                hidden_seen.update(h.raw_name for h in listing.hidden)
                names = {f.path: f.size for f in listing.files}
                if target in names:
                    data = b"".join([c async for c in download_stream(sftp, target)])
                    observations.append(("final", len(data), hashlib.sha256(data).hexdigest()))
                else:
                    observations.append(("absent", 0, None))

    try:
        reading = asyncio.create_task(reader())
        async with writer_pool.session() as sftp:
            result = await upload_stream_atomic(sftp, chunks(), target)
        upload_done.set()
        await reading
    finally:
        await writer_pool.close()
        await reader_pool.close()

    assert result.bytes == len(full)
    assert result.sha256 == want
    assert ("absent", 0, None) in observations, "the reader never ran during the upload"
    assert all(o[1] == len(full) and o[2] == want for o in observations if o[0] == "final")
    assert hashlib.sha256((local / "list.csv").read_bytes()).hexdigest() == want
    assert sorted(os.listdir(local)) == ["list.csv"], "a temporary file was left behind"
    assert [n for n in hidden_seen if not is_partial_upload(n.decode())] == []
    assert all(n.startswith(b".list.csv.") for n in hidden_seen)


async def test_reupload_replaces_the_file_atomically(
    servers: Servers, sftp_folder: tuple[str, Path], tmp_path: Path
) -> None:
    remote, local = sftp_folder
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_bytes(b"email\nold@example.com\n")
    second.write_bytes(b"email\nnew@example.com\n" * 1000)
    pool = SftpPool(servers.sftp)
    try:
        async with pool.session() as sftp:
            await upload_file_atomic(sftp, first, f"{remote}/job.csv")
            result = await upload_file_atomic(sftp, second, f"{remote}/job.csv")
            listed = await list_files(sftp, remote)
    finally:
        await pool.close()
    assert (local / "job.csv").read_bytes() == second.read_bytes()
    assert result.sha256 == hashlib.sha256(second.read_bytes()).hexdigest()
    assert [(f.path, f.size) for f in listed] == [(f"{remote}/job.csv", second.stat().st_size)]


async def test_a_listing_keeps_hidden_and_partial_files_apart_with_their_times(
    servers: Servers, sftp_folder: tuple[str, Path]
) -> None:
    remote, local = sftp_folder
    for name in (b"r.csv", b".r2.csv", b"r3.csv.partial", b".\xff.csv", b"\xfe.csv"):
        (local / os.fsdecode(name)).write_bytes(b"x" * len(name))
    (local / ".folder").mkdir()
    os.utime(local / ".r2.csv", (1_700_000_000, 1_700_000_000))
    pool = SftpPool(servers.sftp)
    try:
        async with pool.session() as sftp:
            listing = await list_folder(sftp, remote)
    finally:
        await pool.close()
    assert [(f.path, f.size) for f in listing.files] == [(f"{remote}/r.csv", 5)]
    assert listing.unreadable == [b"\xfe.csv"]
    hidden = {h.raw_name: h for h in listing.hidden}
    assert sorted(hidden) == [b".r2.csv", b".\xff.csv", b"r3.csv.partial"]
    assert hidden[b".r2.csv"].mtime == 1_700_000_000
    assert hidden[b".r2.csv"].name == ".r2.csv"
    assert (hidden[b".\xff.csv"].name, hidden[b".\xff.csv"].shown) == (None, f"{remote}/.\\xff.csv")


async def test_removing_a_file_another_process_removed_first_is_no_error(
    servers: Servers, sftp_folder: tuple[str, Path]
) -> None:
    remote, local = sftp_folder
    (local / ".l.csv.0123456789ab.partial").write_bytes(b"half")
    pool = SftpPool(servers.sftp)
    try:
        async with pool.session() as sftp:
            first = await remove_if_present(sftp, f"{remote}/.l.csv.0123456789ab.partial")
            again = await remove_if_present(sftp, f"{remote}/.l.csv.0123456789ab.partial")
    finally:
        await pool.close()
    assert (first, again) == (True, False)
    assert os.listdir(local) == []


async def test_download_streams_in_chunks(servers: Servers, sftp_folder: tuple[str, Path]) -> None:
    remote, local = sftp_folder
    data = os.urandom(3 * 1024 * 1024 + 17)
    (local / "responses.csv").write_bytes(data)
    pool = SftpPool(servers.sftp)
    try:
        async with pool.session() as sftp:
            parts = [c async for c in download_stream(sftp, f"{remote}/responses.csv", chunk_size=64 * 1024)]
    finally:
        await pool.close()
    assert b"".join(parts) == data
    assert max(len(p) for p in parts) <= 64 * 1024
    assert len(parts) > 40


async def test_a_wrong_host_key_is_refused(servers: Servers, tmp_path: Path) -> None:
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    known = tmp_path / "known_hosts"
    known.write_text(f"[{servers.sftp.host}]:{servers.sftp.port} {impostor}\n")
    pool = SftpPool(servers.sftp.model_copy(update={"known_hosts": known}))
    with pytest.raises(HostKeyError, match="not pinned") as info:
        async with pool.session():
            pass
    assert str(known) in str(info.value)


async def test_an_unknown_host_is_refused(servers: Servers, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    pool = SftpPool(servers.sftp.model_copy(update={"known_hosts": empty}))
    with pytest.raises(HostKeyError, match="connection refused"):
        async with pool.session():
            pass


async def test_a_missing_known_hosts_file_is_a_configuration_error(servers: Servers, tmp_path: Path) -> None:
    pool = SftpPool(servers.sftp.model_copy(update={"known_hosts": tmp_path / "absent"}))
    with pytest.raises(ConfigurationError, match="must be pinned"):
        async with pool.session():
            pass
