"""Schema migrations (serving/migrations): an empty database upgraded to head has exactly the models' schema,
autogenerate finds nothing to add (so a model change without a migration fails here), a database that
create_all made before migrations is stamped (and its text sealed by 0003), a database at 0001 gets flag records
for its flagged sessions, and replicas that start together migrate once. Each test runs on SQLite and on a real PostgreSQL server
(tests/pg.py)."""
from __future__ import annotations

import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
import sqlalchemy as sa
from sqlalchemy import Column, MetaData, String, create_engine, inspect, text, update

from serving.db import Base, ChatSession, Repository
from serving.migrations import INITIAL_TABLES, SchemaError, alembic_config, current_revision, head_revision


def _revision(repo: Repository) -> str | None:
    with repo.engine.connect() as conn:
        return current_revision(conn)


def _diff(repo: Repository, metadata: MetaData) -> list:
    with repo.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, metadata)


def test_upgrade_from_empty_builds_exactly_the_models_tables(database_url):
    repo = Repository(database_url)
    insp = inspect(repo.engine)
    assert set(insp.get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    assert set(Base.metadata.tables) == INITIAL_TABLES | {"session_flags", "data_keys", "session_keys"}
    for name, table in Base.metadata.tables.items():
        assert [c["name"] for c in insp.get_columns(name)] == [c.name for c in table.columns], name
    assert _revision(repo) == head_revision()
    repo.close()


def test_models_and_migrations_agree(database_url):
    repo = Repository(database_url)
    assert _diff(repo, Base.metadata) == [], "serving/db.py and serving/migrations differ: add a revision"
    drifted = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["messages"].append_column(Column("mood", String(16), nullable=True))
    assert [d[0] for d in _diff(repo, drifted)] == ["add_column"]
    repo.close()


def _migrate(url: str, revision: str, down: bool = False, keys=None) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        (command.downgrade if down else command.upgrade)(alembic_config(conn, keys), revision)
        conn.commit()
    engine.dispose()


def _old_rows(url: str, tenant: str, n_sessions: int, messages: dict[int, str] | None = None) -> list[str]:
    """Sessions (and plaintext messages, {session index: content}) written the way revisions before 0003 did."""
    import uuid
    from datetime import datetime, timezone

    sessions = sa.table("sessions", *(sa.column(c) for c in ("id", "tenant_id", "preference", "locale", "flagged",
                                                             "created", "deleted")), sa.column("preference", sa.JSON))
    msgs = sa.table("messages", *(sa.column(c) for c in ("id", "session_id", "role", "content", "created")))
    ids, now = [str(uuid.uuid4()) for _ in range(n_sessions)], datetime.now(timezone.utc)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created) VALUES (:t, :t, :now)"), {"t": tenant, "now": now})
        for sid in ids:
            conn.execute(sa.insert(sessions).values(id=sid, tenant_id=tenant, preference={"safety": 1.0},
                                                    locale="en", flagged=False, created=now, deleted=False))
        for i, content in (messages or {}).items():
            conn.execute(sa.insert(msgs).values(id=str(uuid.uuid4()), session_id=ids[i], role="user",
                                                content=content, created=now))
    engine.dispose()
    return ids


def test_a_database_made_by_create_all_is_stamped_and_keeps_its_rows(database_url):
    _migrate(database_url, "0001")  # the tables create_all made before migrations, without the version table
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    session, = _old_rows(database_url, "clinic-a", 1, {0: "an old plaintext message"})

    repo = Repository(database_url)
    assert _revision(repo) == head_revision()
    assert repo.get_session("clinic-a", session).preference == {"safety": 1.0}
    assert [m.content for m in repo.list_messages(session)] == ["an old plaintext message"]
    assert _diff(repo, Base.metadata) == []
    repo.close()


def test_0002_gives_the_sessions_flagged_before_it_their_flag_records(database_url):
    _migrate(database_url, "0001")
    twice, silent, erased, calm = (ChatSession(id=sid) for sid in _old_rows(database_url, "clinic-a", 4,
                                                                             {3: "a calm message"}))
    old = Repository(database_url, create_tables=False)
    first = old.add_audit("crisis_protocol", tenant_id="clinic-a", session_id=twice.id,
                          detail={"rules": ["kill_myself"], "by_model": False, "prob": 0.2})
    last = old.add_audit("crisis_protocol", tenant_id="clinic-a", session_id=twice.id,
                         detail={"rules": [], "by_model": True, "prob": 0.9})
    old.add_audit("crisis_protocol", tenant_id="clinic-a", session_id=erased.id, detail={"rules": ["means"]})
    gone = old.add_audit("session_deleted", tenant_id="clinic-a", session_id=erased.id, detail={})
    with old.engine.begin() as conn:
        conn.execute(update(ChatSession).where(ChatSession.id.in_([twice.id, silent.id, erased.id]))
                     .values(flagged=True))
        conn.execute(update(ChatSession).where(ChatSession.id == erased.id).values(deleted=True))
    old.close()

    repo = Repository(database_url)
    assert _revision(repo) == head_revision() == "0003"
    f = repo.get_flag(twice.id)
    assert (f.tenant_id, f.flagged_turns, f.detector, f.categories) == ("clinic-a", 2, "both", ["kill_myself"])
    assert (f.first_flagged_at, f.last_flagged_at) == (first.created, last.created) and f.erased_at is None
    f = repo.get_flag(silent.id)
    assert (f.flagged_turns, f.detector, f.categories) == (1, "unknown", [])
    assert f.first_flagged_at == repo.find_session(silent.id).created
    f = repo.get_flag(erased.id)
    assert (f.detector, f.categories, f.erased_at) == ("rules", ["means"], gone.created)
    assert repo.get_flag(calm.id) is None and len(repo.list_flags("open")) == 3
    keys = repo.keys
    repo.close()

    _migrate(database_url, "0001", down=True, keys=keys)
    engine = create_engine(database_url)
    assert "session_flags" not in inspect(engine).get_table_names()
    engine.dispose()
    _migrate(database_url, "head", keys=keys)
    repo = Repository(database_url)
    assert {f.session_id for f in repo.list_flags("all")} == {twice.id, silent.id, erased.id}
    assert [m.content for m in repo.list_messages(calm.id)] == ["a calm message"]
    repo.close()


def test_a_schema_that_is_not_attunes_is_refused(database_url):
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE tenants (id VARCHAR(64) PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(SchemaError, match="not an Attune schema.*empty database"):
        Repository(database_url)


@pytest.mark.timeout(120)  # without the lock, PostgreSQL replicas can block each other's CREATE TABLE for good
def test_replicas_that_start_together_migrate_once(database_url):
    barrier, errors, repos = threading.Barrier(6), [], []

    def replica():
        try:
            barrier.wait()
            repos.append(Repository(database_url))
        except Exception as e:  # collected: an exception in a thread would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=replica) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(repos) == 6
    with repos[0].engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
    repos[0].ensure_tenant("clinic-a")
    assert all(r.ping() for r in repos)
    for r in repos:
        r.close()
