"""ESP connectors: one module per ESP behind one small interface (:class:`Connector`).

A connector is data (the list file format, the response folders) plus a few async calls
(import, send, their statuses) and a response-file parser. Which connector serves a job comes
from the configured ESP accounts (:mod:`shared.esp.accounts`).
"""

from shared.esp.accounts import AccountConfig, Accounts, AccountsSettings
from shared.esp.base import (
    BadRow,
    Connector,
    ConnectorContext,
    ImportState,
    ImportStatus,
    ListFormat,
    NotSupportedError,
    PullPage,
    SendState,
    SendStatus,
    WebhookAuthError,
)
from shared.esp.registry import Connectors, connector_for
from shared.infra.db.jobs import SentBroadcast

__all__ = [
    "AccountConfig",
    "Accounts",
    "AccountsSettings",
    "BadRow",
    "Connector",
    "ConnectorContext",
    "Connectors",
    "ImportState",
    "ImportStatus",
    "ListFormat",
    "NotSupportedError",
    "PullPage",
    "SendState",
    "SendStatus",
    "SentBroadcast",
    "WebhookAuthError",
    "connector_for",
]
