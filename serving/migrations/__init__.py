"""Schema migrations (Alembic) for the models in serving.records, applied whenever a `Repository` opens a database.

`upgrade(engine)` brings a database to the newest revision in one transaction. On PostgreSQL that transaction
first takes an advisory lock, so replicas that start together against one database migrate once, one after the
other; on SQLite the Repository's BEGIN IMMEDIATE holds the write lock for the same purpose. A database that
`Base.metadata.create_all` built before migrations existed is stamped with the initial revision first.

Changing a model needs a new revision in versions/. Autogenerate one against a database at head, then read it:
    from alembic import command
    from serving.db import Repository
    from serving.migrations import alembic_config
    repo = Repository("sqlite:////tmp/dev.db")
    with repo.engine.begin() as conn:
        command.revision(alembic_config(conn), message="add x", autogenerate=True, rev_id="0002")
tests/serving/test_migrations.py fails while the models and the migrations disagree.
"""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from serving.crypto import KeyRing, register

HERE = Path(__file__).resolve().parent
INITIAL_REVISION = "0001"
INITIAL_TABLES = frozenset({"tenants", "api_keys", "sessions", "messages", "feedback", "audit_events"})
"""The tables `create_all` made before migrations existed; all present and no version table = stamp 0001."""
PG_LOCK_KEY = 0x617474756E65
"""pg_advisory_xact_lock key ("attune" in ASCII) held while one process migrates."""


class SchemaError(RuntimeError):
    """The database holds a schema that no revision describes; the message says what to do."""


def alembic_config(connection: Connection | None = None, keys: KeyRing | None = None) -> Config:
    """An Alembic Config for versions/ that runs on `connection` (env.py uses it; no alembic.ini is involved).
    `keys`: the data keys that seal (0003) or open (its downgrade) text already in the database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    cfg.attributes["keys"] = keys
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, keys: KeyRing | None = None) -> None:
    """Migrate the database behind `engine` to head; safe to call from several processes at once. With `keys`,
    then check them against the data key ids the database knows and record the current one (serving.crypto.
    register), in the same transaction, so replicas started with different new keys cannot both be accepted."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        cfg = alembic_config(conn, keys)
        if current_revision(conn) is None:
            present = INITIAL_TABLES & set(inspect(conn).get_table_names())
            if present == INITIAL_TABLES:
                command.stamp(cfg, INITIAL_REVISION)
            elif present:
                raise SchemaError(f"the database has tables {sorted(present)} but not "
                                  f"{sorted(INITIAL_TABLES - present)} and no alembic_version: it is not an "
                                  "Attune schema; point database_url at an empty database or restore the missing tables")
        command.upgrade(cfg, "head")
        if keys is not None:
            register(conn, keys)
        conn.commit()
