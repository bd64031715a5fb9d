"""PostgreSQL access: one asyncpg pool per process, and the migration runner."""

from shared.infra.db.core import (
    Conn,
    connect,
    create_pool,
    dsn_kwargs,
    outside_message_context,
    postgres_answers,
)
from shared.infra.db.migrate import MIGRATIONS_DIR, Migration, applied_migrations, load_migrations, migrate
from shared.infra.db.sql import InvalidIdentifierError, copy_merge, quote_ident, quote_qualified

__all__ = [
    "MIGRATIONS_DIR",
    "Conn",
    "InvalidIdentifierError",
    "Migration",
    "applied_migrations",
    "connect",
    "copy_merge",
    "create_pool",
    "dsn_kwargs",
    "load_migrations",
    "migrate",
    "outside_message_context",
    "postgres_answers",
    "quote_ident",
    "quote_qualified",
]
