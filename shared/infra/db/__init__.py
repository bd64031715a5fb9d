"""PostgreSQL access: connections and one asyncpg pool per process, the migration runner (two
sets: espbridge's own tables and the CRM's) and quoted SQL names; the control tables' SQL in the
modules named for them (:mod:`.jobs`, :mod:`.files`, :mod:`.cursors`, :mod:`.replays`,
:mod:`.uploaded_lists`) and the analysts' funnel in :mod:`.responses`."""

from shared.infra.db.core import (
    Conn,
    connect,
    create_pool,
    dsn_kwargs,
    outside_message_context,
    postgres_answers,
)
from shared.infra.db.migrate import (
    CRM_MIGRATIONS,
    ESPBRIDGE_MIGRATIONS,
    MIGRATIONS_DIR,
    Migration,
    MigrationSet,
    SetMigrated,
    SetStatus,
    applied_migrations,
    load_migrations,
    migrate,
    migrate_databases,
    migration_status,
)
from shared.infra.db.sql import InvalidIdentifierError, copy_merge, quote_ident, quote_qualified

__all__ = [
    "CRM_MIGRATIONS",
    "ESPBRIDGE_MIGRATIONS",
    "MIGRATIONS_DIR",
    "Conn",
    "InvalidIdentifierError",
    "Migration",
    "MigrationSet",
    "SetMigrated",
    "SetStatus",
    "applied_migrations",
    "connect",
    "copy_merge",
    "create_pool",
    "dsn_kwargs",
    "load_migrations",
    "migrate",
    "migrate_databases",
    "migration_status",
    "outside_message_context",
    "postgres_answers",
    "quote_ident",
    "quote_qualified",
]
