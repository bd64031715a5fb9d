"""The names every flavor of the sandbox shares: folders, list columns, event types, import and send states.

What belongs to one ESP's protocol (its routes, file names and columns) lives in its flavor module.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum, auto

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
"""ESP and account names."""

# The doc leaves external_id free; it names the manifest file, so it must be one visible file name.
EXTERNAL_ID_RE = re.compile(r"^[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,199}$")

# The generic flavor's API and the test-support `_sandbox/stats` of every flavor live under it.
API_PREFIX = "/api/v1/accounts"

DROP = "drop"
RESPONSES = "responses"
ARCHIVE = "archive"
MANIFEST = "manifest"
ACCOUNT_FOLDERS = (DROP, RESPONSES, ARCHIVE, MANIFEST)

STATE_FILE = ".sandbox-state.json"
LISTS_FOLDER = ".sandbox-lists"
UPLOADS_FOLDER = ".sandbox-uploads"
"""Recipients received in API requests, staged per import until it runs."""

EMAIL = "Email"
COMMUNICATION_KEY = "CommunicationKey"

MAX_LISTED_ERRORS = 100


class EventType(StrEnum):
    """What the simulation produces per recipient; each flavor writes them in its own format.

    ``sent``: the message left the ESP; ``delivered``: the receiving server accepted it;
    ``bounce_hard``: permanent failure (unknown address); ``bounce_soft``: temporary failure
    (mailbox full, greylisting given up); ``open`` (may repeat); ``click`` (the event has a URL);
    ``unsubscribe`` through the message; ``complaint``: marked as spam. ``returned`` is ESP-only
    (espbridge has no type for it): an auto-reply or a late bounce of a delivered message,
    simulated only for a flavor whose phases carry it (``RATE_RETURNED``) and counted in the
    manifest's ``esp_only``, never in ``counts``.
    """

    # StrEnum's auto() values are the names in lower case: SENT is "sent", BOUNCE_HARD "bounce_hard".
    SENT = auto()
    DELIVERED = auto()
    BOUNCE_HARD = auto()
    BOUNCE_SOFT = auto()
    OPEN = auto()
    CLICK = auto()
    UNSUBSCRIBE = auto()
    COMPLAINT = auto()
    RETURNED = auto()


ESP_ONLY_TYPES = frozenset({EventType.RETURNED})
"""Event types espbridge has no type for: never in a manifest's ``counts``."""

COUNTED_TYPES = tuple(t for t in EventType if t not in ESP_ONLY_TYPES)
"""The manifest's ``counts`` keys, in this order."""


class ImportState(StrEnum):
    """The `state` of an import."""

    QUEUED = "queued"
    """Accepted, not started."""
    RUNNING = "running"
    """The file is being read."""
    DONE = "done"
    """Imported; the valid rows can be sent."""
    FAILED = "failed"
    """The file could not be imported at all (missing column, unreadable)."""


class SendState(StrEnum):
    """The `state` of a send."""

    SCHEDULED = "scheduled"
    """Accepted; waits for `send_at`."""
    SENDING = "sending"
    """Messages are going out."""
    SENT = "sent"
    """Every message went out (responses keep arriving afterwards)."""
    FAILED = "failed"
    """The send could not be carried out."""
    CANCELLED = "cancelled"
    """Cancelled by the client before its messages went out (no responses follow)."""


def utc_text(moment: datetime | float) -> str:
    """ISO 8601 in UTC with `Z`, whole seconds, e.g. `2026-11-22T10:00:03Z`."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> datetime:
    """The inverse of :func:`utc_text` (any ISO 8601 form with a zone is accepted)."""
    return datetime.fromisoformat(text).astimezone(UTC)
