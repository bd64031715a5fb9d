"""What a process needs to talk to the ESPs, opened in one place: the configured accounts, the SFTP
pool, the HTTP session, the accounts' rate limits and the connectors that share them; and the
settings they are opened from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aiohttp
from pydantic import Field

from shared.esp.accounts import Accounts, AccountsSettings
from shared.esp.base import ConnectorContext
from shared.esp.limits import RateLimits
from shared.esp.registry import Connectors
from shared.infra.settings import PostgresSettings, SftpSettings
from shared.infra.sftp import SftpPool
from shared.runtime.settings import DatabaseServiceSettings


class EspServiceSettings(DatabaseServiceSettings):
    """Settings of a service that talks to ESPs: its database, the ESPs' SFTP site, the accounts."""

    sftp: SftpSettings = Field(
        default_factory=SftpSettings, description="the ESPs' SFTP site (list drops, response folders)"
    )
    accounts: AccountsSettings = Field(default_factory=AccountsSettings)


@dataclass(frozen=True, slots=True)
class EspResources:
    """A process's ESP accounts, SFTP pool, HTTP session and connectors (one per account, kept for
    the process's life so that tokens and rate limits outlive a message)."""

    accounts: Accounts
    sftp: SftpPool
    http: aiohttp.ClientSession
    connectors: Connectors

    @classmethod
    async def open(
        cls,
        stack: contextlib.AsyncExitStack,
        accounts: AccountsSettings,
        sftp: SftpSettings,
        database: PostgresSettings | None = None,
    ) -> EspResources:
        """Read the accounts file (a bad one fails here, before anything is opened), then open the
        SFTP pool, the HTTP session and the rate limits on ``stack``, which closes them in reverse.

        With a ``database`` the accounts' rate limits are shared by every process using it.
        """
        configured = Accounts.load(accounts)
        pool = SftpPool(sftp)
        stack.push_async_callback(pool.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        rates = await RateLimits.open(stack, database)
        return cls(configured, pool, http, Connectors(configured, ConnectorContext(http, pool, rates)))
