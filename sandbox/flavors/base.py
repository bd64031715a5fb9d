"""The plug-in boundary between the sandbox's shared engine and one ESP flavor.

The engine (``sandbox.engine``) owns what every flavor shares: accounts and their folders, imports
and sends with their states, the saved state and resuming after a restart, the seeded simulation,
the manifest, and writing response files phase by phase ``PHASE_DELAY_S`` apart. A flavor says how
its ESP looks from outside: the routes it serves, how it reads a list file, how it names and writes
response files, and what triggers its imports and sends (API calls through its routes, or files
appearing in an SFTP folder it watches).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sandbox.listfile import ListReader, import_list
from sandbox.protocol import ACCOUNT_FOLDERS
from sandbox.responses import EventLogFormat, ResponseFormat

if TYPE_CHECKING:
    from sandbox.contacts import ContactEvent
    from sandbox.engine import Account


@dataclass(frozen=True)
class Flavor:
    """One ESP the sandbox can play (``ESPBRIDGE_SANDBOX_FLAVOR``); each flavor module defines one."""

    name: str
    responses: ResponseFormat | EventLogFormat
    """Its responses: files (the phases, the file names, the rows) or an event log its routes serve
    (the phases, the stream and item of each event)."""
    read_list: ListReader = import_list
    """Reads a list file of an ``Account.create_import`` in a worker thread: validates it and stores
    the valid recipients (:func:`sandbox.listfile.import_list`, comma-delimited by default; with the
    flavor's delimiter). A flavor whose ESP takes recipients its own way records them with
    ``Account.imported_list`` and reads no list files."""
    folders: Sequence[str] = ACCOUNT_FOLDERS
    """The account's folders (relative to it), created at the start if missing; ``manifest/`` is
    always created."""
    routes: Sequence[web.RouteDef] = ()
    """Its REST API, with full paths. Paths under ``API_PREFIX`` need the bearer token (checked by
    the shared middleware); a flavor with another authentication serves other paths and checks it
    itself. Handlers find the accounts in ``request.app[sandbox.api.CONTEXT]``."""
    watch: Callable[[Account], Coroutine[Any, Any, None]] | None = None
    """Background work per account, started once the server listens and cancelled at the stop,
    e.g. watching an SFTP folder and calling ``account.create_import``/``create_send``."""
    check_settings: Callable[[], object] | None = None
    """Reads the flavor's own ``ESPBRIDGE_SANDBOX_*`` settings (a pydantic settings class) at the
    start, so invalid ones stop ``python -m sandbox`` with exit code 2 like the shared ones."""
    on_contact_event: Callable[[Account, ContactEvent], Awaitable[None]] | None = None
    """How the flavor reports a change made on the ESP side (a link unsubscribe, a complaint, a
    double opt-in confirmation…): its webhook call, a row in its response file, an item its API
    serves. Called for changes made through the ``_sandbox/contacts`` control route and for
    confirmations, never for changes an API caller made. An error it raises answers the route."""
    job_required_for: frozenset[str] = frozenset()
    """Control-route actions (e.g. ``unsubscribe_link``) this flavor's ESP reports only in a
    broadcast's responses: without a ``job`` the route answers 400 and changes nothing."""
