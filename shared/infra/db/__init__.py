"""PostgreSQL access: connections and one asyncpg pool per process, the migration runner and
quoted SQL names; the control tables' SQL in the modules named for them (:mod:`.jobs`,
:mod:`.files`, :mod:`.cursors`, :mod:`.replays`, :mod:`.uploaded_lists`) and the analysts' funnel in
:mod:`.responses`."""

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
