"""SFTP on asyncssh: pinned host keys, atomic uploads, streaming downloads, safe names.

* Host keys are always checked against a ``known_hosts`` file; an unknown or changed key is
  refused with :class:`~shared.model.errors.HostKeyError`. There is no way to turn the check off.
* Uploads go to a hidden temporary name in the target folder and are renamed when complete, so
  the ESP (or any reader) never sees a half-written list; :func:`is_partial_upload` tells such a
  name (one a crash left behind) from anyone else's.
* A folder listing keeps apart the files whose names say they are not to be read (yet): hidden
  ones, and partial uploads.
* Remote file names are never used as local paths without :func:`safe_local_name`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import posixpath
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import asyncssh

from shared.infra.settings import SftpSettings
from shared.model.errors import ConfigurationError, HostKeyError, PermanentError, UnavailableError

log = logging.getLogger(__name__)

CHUNK_SIZE = 256 * 1024
PARTIAL_SUFFIX = ".partial"
_PARTIAL_TAG_HEX = 12
_PARTIAL_NAME = re.compile(rf"\.(?s:.+)\.[0-9a-f]{{{_PARTIAL_TAG_HEX}}}{re.escape(PARTIAL_SUFFIX)}")


@dataclass(frozen=True, slots=True)
class Uploaded:
    """What an atomic upload put on the server."""

    remote_path: str
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file in a remote folder listing."""

    path: str
    size: int
    mtime: float


def remote_join(folder: str, name: str) -> str:
    """Join a remote folder and a plain file name, refusing names that would leave the folder."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise PermanentError(f"unsafe remote file name {name!r}")
    return posixpath.join(folder, name)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_local_name(remote_path: str) -> str:
    """A local file name derived from a remote path that cannot escape a directory.

    Keeps the readable part of the base name and adds a short hash of the whole remote path, so
    two remote files never map to one local name.
    """
    base = _UNSAFE.sub("_", posixpath.basename(remote_path.replace("\\", "/"))).strip("._") or "file"
    digest = hashlib.sha256(remote_path.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{digest}-{base[:100]}"


def _connect_options(settings: SftpSettings) -> asyncssh.SSHClientConnectionOptions:
    if not settings.known_hosts.is_file():
        raise ConfigurationError(
            f"known_hosts file {settings.known_hosts} does not exist: the SFTP server's host key "
            "must be pinned before espbridge connects"
        )
    keys: list[asyncssh.SSHKey] = []
    if settings.client_key_file is not None:
        try:
            keys.append(asyncssh.read_private_key(settings.client_key_file))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConfigurationError(
                f"cannot read SFTP client key {settings.client_key_file}: {exc}"
            ) from None
    return asyncssh.SSHClientConnectionOptions(
        username=settings.username,
        client_keys=keys or None,
        password=settings.password.get_secret_value() if settings.password else None,
        known_hosts=str(settings.known_hosts),
        agent_path=None,
        connect_timeout=settings.connect_timeout_s,
        keepalive_interval=30,
    )


async def connect(settings: SftpSettings) -> asyncssh.SSHClientConnection:
    """An SSH connection with the server's host key checked against the pinned known_hosts."""
    options = _connect_options(settings)
    where = f"{settings.host}:{settings.port}"
    try:
        return await asyncssh.connect(settings.host, settings.port, options=options)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostKeyError(
            f"SFTP server {where} presented a host key that is not pinned in {settings.known_hosts}; "
            f"connection refused ({exc.reason})"
        ) from None
    except asyncssh.PermissionDenied as exc:
        raise ConfigurationError(
            f"SFTP server {where} refused user {settings.username!r}: {exc.reason}"
        ) from None
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        raise UnavailableError(f"SFTP server {where} is unreachable: {exc}") from exc


class SftpPool:
    """One SSH connection per process, with up to ``max_connections`` SFTP sessions on it.

    A dropped connection is re-opened on the next use.
    """

    def __init__(self, settings: SftpSettings) -> None:
        self._settings = settings
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.max_connections)

    async def _connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect(self._settings)
            return self._conn

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[asyncssh.SFTPClient]:
        """An SFTP session for one unit of work."""
        async with self._slots:
            conn = await self._connection()
            try:
                client = await conn.start_sftp_client()
            except (OSError, asyncssh.Error) as exc:
                self._conn = None
                raise UnavailableError(f"cannot open an SFTP session: {exc}") from exc
            try:
                yield client
            finally:
                client.exit()

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await self._conn.wait_closed()
            self._conn = None


def partial_upload_name(remote_path: str) -> str:
    """The temporary path an upload to ``remote_path`` is written to: ``.<name>.<12 hex>.partial``."""
    folder, name = posixpath.split(remote_path)
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:_PARTIAL_TAG_HEX]}{PARTIAL_SUFFIX}")


def is_partial_upload(name: str) -> bool:
    """Whether a file name is exactly of espbridge's own partial-upload form (see
    :func:`partial_upload_name`); a name of any other form is someone else's file."""
    return _PARTIAL_NAME.fullmatch(name) is not None


async def _finish(sftp: asyncssh.SFTPClient, tmp: str, remote_path: str) -> None:
    try:
        await sftp.posix_rename(tmp, remote_path)  # atomic replace (OpenSSH extension)
    except asyncssh.SFTPOpUnsupported:
        # Servers without posix-rename: plain rename fails if the target exists, so remove first.
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await sftp.remove(remote_path)
        await sftp.rename(tmp, remote_path)


async def upload_stream_atomic(
    sftp: asyncssh.SFTPClient, chunks: AsyncIterable[bytes], remote_path: str
) -> Uploaded:
    """Stream chunks to ``remote_path`` via a hidden temporary name, then rename into place."""
    tmp = partial_upload_name(remote_path)
    digest = hashlib.sha256()
    size = 0
    try:
        async with sftp.open(tmp, "wb") as f:
            async for chunk in chunks:
                if chunk:
                    await f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        await _finish(sftp, tmp, remote_path)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(sftp.remove(tmp))
        raise
    return Uploaded(remote_path, size, digest.hexdigest())


async def upload_file_atomic(sftp: asyncssh.SFTPClient, local_path: Path, remote_path: str) -> Uploaded:
    """Upload a local file (parallel SFTP requests) via a temporary name, then rename into place."""
    digest = hashlib.sha256()
    with local_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    tmp = partial_upload_name(remote_path)
    try:
        await sftp.put(str(local_path), tmp)
        await _finish(sftp, tmp, remote_path)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(sftp.remove(tmp))
        raise
    return Uploaded(remote_path, local_path.stat().st_size, digest.hexdigest())


async def remove_if_present(sftp: asyncssh.SFTPClient, remote_path: str) -> bool:
    """Remove a remote file; False if it was gone already (another process may have removed it).

    Raises :class:`PermanentError` if the server refuses (no permission, say).
    """
    try:
        await sftp.remove(remote_path)
    except asyncssh.SFTPNoSuchFile:
        return False
    except asyncssh.SFTPError as exc:
        raise PermanentError(f"cannot remove {remote_path}: {exc.reason}") from None
    return True


async def download_stream(
    sftp: asyncssh.SFTPClient, remote_path: str, chunk_size: int = CHUNK_SIZE
) -> AsyncIterator[bytes]:
    """The bytes of a remote file in chunks, never the whole file in memory."""
    async with sftp.open(remote_path, "rb") as f:
        while True:
            chunk = cast(bytes, await f.read(chunk_size))  # binary mode reads bytes
            if not chunk:
                return
            yield chunk


def shown_path(folder: str, raw_name: bytes) -> str:
    """A remote path for people and logs: bytes of the name that are not UTF-8 shown escaped."""
    return posixpath.join(folder, raw_name.decode("utf-8", "backslashreplace"))


@dataclass(frozen=True, slots=True)
class HiddenFile:
    """A regular file whose name says it is not to be read (yet): it starts with ``.`` (an upload
    in progress, or a file kept out of sight) or ends with ``.partial``."""

    folder: str
    raw_name: bytes
    """As the server sent it; it may not be UTF-8."""
    size: int
    mtime: float

    @property
    def name(self) -> str | None:
        """The name, or None where it is not UTF-8."""
        try:
            return self.raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return None

    @property
    def shown(self) -> str:
        """Its path as :func:`shown_path` writes it."""
        return shown_path(self.folder, self.raw_name)


@dataclass(frozen=True, slots=True)
class Listing:
    """A remote folder's regular files: the complete ones, the hidden ones, and the names that
    cannot be handled."""

    files: list[RemoteFile]
    unreadable: list[bytes]
    """Names that are not UTF-8: they cannot travel in messages or the ledger, so they are left alone."""
    hidden: list[HiddenFile]
    """Files whose names say they are not to be read (yet); what becomes of them is the caller's rule."""


async def list_folder(sftp: asyncssh.SFTPClient, folder: str) -> Listing:
    """The regular files in a remote folder, complete ones apart from hidden and partial ones.

    Names are read as bytes, so one name that is not UTF-8 cannot break the listing of the rest.
    Any other name is taken as it is (a backslash, a space, a newline): it is only ever used as a
    remote path, never as a local one (see :func:`safe_local_name`).
    """
    files: list[RemoteFile] = []
    unreadable: list[bytes] = []
    hidden: list[HiddenFile] = []
    try:
        entries = await sftp.readdir(folder.encode("utf-8"))
    except asyncssh.SFTPNoSuchFile:
        raise PermanentError(f"remote folder {folder} does not exist") from None
    for entry in entries:
        raw = entry.filename if isinstance(entry.filename, bytes) else entry.filename.encode("utf-8")
        attrs = entry.attrs
        if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR or b"/" in raw:
            continue
        size, mtime = attrs.size or 0, float(attrs.mtime or 0)
        if raw.startswith(b".") or raw.endswith(PARTIAL_SUFFIX.encode()):
            hidden.append(HiddenFile(folder, raw, size, mtime))
            continue
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            unreadable.append(raw)
            continue
        files.append(RemoteFile(posixpath.join(folder, name), size, mtime))
    files.sort(key=lambda f: (f.mtime, f.path))
    hidden.sort(key=lambda f: (f.mtime, f.raw_name))
    return Listing(files, sorted(unreadable), hidden)


async def list_files(sftp: asyncssh.SFTPClient, folder: str) -> list[RemoteFile]:
    """The regular, complete files of :func:`list_folder`."""
    return (await list_folder(sftp, folder)).files
