"""``espbridge gather``: response gathering on demand."""

from __future__ import annotations

from shared.esp import AccountsSettings
from shared.infra.settings import KafkaSettings, PostgresSettings, SftpSettings
from shared.operations.gathering import gather_now


async def gather_now_command() -> int:
    """``gather now``: scan the ESP accounts for new response files, and pull their APIs, now."""
    files = await gather_now(KafkaSettings(), PostgresSettings(), SftpSettings(), AccountsSettings())
    for f in files:
        print(f"{f.esp}/{f.account}\t{f.path}\t{f.size}")
    print(f"{len(files)} new response file(s) announced")
    return 0
