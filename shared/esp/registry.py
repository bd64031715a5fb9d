"""Connector names → implementations."""

from __future__ import annotations

import aiohttp

from shared.errors import ConfigurationError
from shared.esp.accounts import AccountConfig
from shared.esp.base import Connector
from shared.esp.generic import GenericConnector

CONNECTORS: dict[str, type[GenericConnector]] = {"generic": GenericConnector}


def connector_for(account: AccountConfig, session: aiohttp.ClientSession) -> Connector:
    """The connector of an account, sharing the process's HTTP session."""
    try:
        cls = CONNECTORS[account.connector]
    except KeyError:
        raise ConfigurationError(
            f"account {account.esp}/{account.account} names unknown connector {account.connector!r} "
            f"(known: {', '.join(sorted(CONNECTORS))})"
        ) from None
    return cls(account, session)
