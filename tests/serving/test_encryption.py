"""Encryption at rest (serving/crypto.py): the raw tables (and, on SQLite, the database files; on PostgreSQL, the
tables' heap files) hold no patient text written through the Repository, the HTTP API or a pre-0003 database; an
erased session's ciphertext opens with no key the service still holds; data keys rotate without re-encrypting text
and a removed or wrong key is refused with a message that says what to do. Tests taking `database_url` run on
SQLite and on a real PostgreSQL server (tests/pg.py)."""
from __future__ import annotations

import base64
import os
import stat

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from attune import cli
from serving.api_router import create_app
from serving.crypto import (ENV_KEY, ENV_KEY_FILE, DataKeyError, KeyRing, SessionCipher, load_keyring,
                            new_key_text)
from serving.db import Repository, SessionKey
from tests.serving.test_chat import REPLIES, make  # noqa: F401  (make is a fixture)

PREF = {"empathy": 0.5, "safety": 0.5}
SECRETS = ["my brother hid the car keys after the overdose", "Tuesday I counted the tablets again",
           "You deserve support with the tablets", "I think about the bridge on Hollis street"]


def ring(*keys: str) -> KeyRing:
    return KeyRing.from_text(",".join(keys), "the test keys")


def raw_dump(repo: Repository) -> bytes:
    """Every value of every table, as SQL returns it; on PostgreSQL also the tables' heap files after a checkpoint
    (dead row versions included), on SQLite the database, WAL and journal files."""
    out = []
    with repo.engine.connect() as conn:
        tables = inspect(conn).get_table_names()
        for t in tables:
            for row in conn.execute(text(f'SELECT * FROM "{t}"')):
                out += [bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode() for v in row]
        if conn.dialect.name == "postgresql":
            conn.execute(text("CHECKPOINT"))
            for t in tables:
                path = conn.execute(text("SELECT pg_relation_filepath(:t)"), {"t": t}).scalar()
                out.append(bytes(conn.execute(text("SELECT pg_read_binary_file(:p)"), {"p": path}).scalar()))
        conn.rollback()
    if repo.engine.dialect.name == "sqlite":
        db = repo.engine.url.database
        out += [open(p, "rb").read() for p in (db, db + "-wal", db + "-journal") if os.path.exists(p)]
    return b"\n".join(out)


def leaked(dump: bytes, texts=SECRETS) -> list[str]:
    return [t for t in texts if t.encode() in dump or t[:20].encode() in dump]


def test_the_raw_database_holds_no_patient_text(database_url):
    repo = Repository(database_url, keys=ring(new_key_text()))
    repo.ensure_tenant("clinic-a", name="CONTROL tenant name, stored in clear")
    s = repo.create_session("clinic-a", PREF)
    user, reply1, _, reply2 = (repo.add_message(s.id, role, t) for role, t in
                               [("user", SECRETS[0]), ("assistant", SECRETS[2]), ("user", SECRETS[0]),
                                ("assistant", SECRETS[3])])
    repo.add_feedback(s.id, chosen_message_id=reply2.id, rejected_message_id=reply1.id)
    repo.add_feedback(s.id, message_id=reply1.id, rating="up")
    repo.add_message(s.id, "user", SECRETS[1])

    dump = raw_dump(repo)
    assert b"CONTROL tenant name" in dump  # the scan does find text stored in clear
    assert leaked(dump) == []
    assert [m.content for m in repo.list_messages(s.id)] == [SECRETS[i] for i in (0, 2, 0, 3, 1)]
    pair, thumb = repo.list_feedback(s.id)
    assert (pair.prompt, pair.chosen, pair.rejected) == (SECRETS[0], SECRETS[3], SECRETS[2])
    assert (thumb.chosen, thumb.rejected, thumb.to_pair("empathy")) == (SECRETS[2], None, None)
    assert user.content == SECRETS[0] and repo.list_messages(s.id, limit=1)[0].content == SECRETS[1]
    repo.close()


def test_text_through_the_http_api_is_stored_sealed(make, tmp_path):  # noqa: F811
    svc = make()
    client = TestClient(create_app(svc))
    auth = {"Authorization": svc.test_keys["alice"]}
    history = [{"role": "user", "content": SECRETS[0]}, {"role": "assistant", "content": SECRETS[2]},
               {"role": "user", "content": SECRETS[1]}]
    r = client.post("/v1/chat/completions", json={"messages": history, "preference": "warm"}, headers=auth)
    sid = r.json()["attune"]["session_id"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": SECRETS[3]}],
                                                  "session_id": sid}, headers=auth)
    assert r.status_code == 200, r.text
    data = client.get(f"/v1/sessions/{sid}/messages", headers=auth).json()["data"]
    assert [m["content"] for m in data] == [SECRETS[0], SECRETS[2], SECRETS[1], REPLIES["warm"], SECRETS[3],
                                            REPLIES["warm"]]
    r = client.post(f"/v1/sessions/{sid}/feedback", json={"message_id": data[3]["id"], "rating": "up"}, headers=auth)
    assert r.status_code in (200, 201), r.text
    assert svc.repo.list_feedback(sid)[0].chosen == REPLIES["warm"]

    dump = raw_dump(svc.repo)
    assert leaked(dump, [*SECRETS, REPLIES["warm"]]) == []
    assert (tmp_path / "data" / "data_key").exists()  # the default key file, beside the SQLite database


def test_an_erased_sessions_ciphertext_opens_with_no_key_the_service_holds(database_url):
    data_keys = [new_key_text(), new_key_text()]
    repo = Repository(database_url, keys=ring(*data_keys))
    repo.ensure_tenant("clinic-a")
    s, keep = repo.create_session("clinic-a", PREF), repo.create_session("clinic-a", PREF)
    msg = repo.add_message(s.id, "user", SECRETS[1])
    repo.add_message(keep.id, "user", "another session")
    with repo.engine.connect() as conn:  # what a backup or a stolen copy of the tables would hold
        sealed = conn.execute(text("SELECT sealed FROM messages WHERE id = :m"), {"m": msg.id}).scalar()
        wrapped = tuple(conn.execute(text("SELECT data_key_id, wrapped FROM session_keys WHERE session_id = :s"),
                                     {"s": s.id}).one())
    assert repo.keys.unwrap(s.id, *wrapped).open("message", msg.id, sealed) == SECRETS[1]  # opens before erasure

    assert repo.delete_session("clinic-a", s.id)
    with repo._tx.begin() as db:
        held = [(k.session_id, k.data_key_id, k.wrapped) for k in db.scalars(sa.select(SessionKey))]
    assert [h[0] for h in held] == [keep.id]  # the erased session's wrapped key is gone
    every_key = [repo.keys._unwrap_bytes(*h) for h in held] + [base64.b64decode(k) for k in data_keys]
    for key in every_key:  # each key the service holds, with the right associated data
        with pytest.raises(DataKeyError, match="does not open"):
            SessionCipher(s.id, key).open("message", msg.id, sealed)
    assert leaked(raw_dump(repo), [SECRETS[1]]) == [] and repo.list_messages(s.id) == []
    repo.close()


def test_sealed_text_is_bound_to_its_row_and_session(database_url):
    repo = Repository(database_url, keys=ring(new_key_text()))
    repo.ensure_tenant("clinic-a")
    s = repo.create_session("clinic-a", PREF)
    first, second = repo.add_message(s.id, "user", "first"), repo.add_message(s.id, "user", "second")
    with repo.engine.begin() as conn:  # swap two rows' ciphertext, as someone with write access to the table could
        conn.execute(text("UPDATE messages SET sealed = (SELECT sealed FROM messages WHERE id = :b) WHERE id = :a"),
                     {"a": first.id, "b": second.id})
    with pytest.raises(DataKeyError, match=f"message '{first.id}'.*altered or moved"):
        repo.list_messages(s.id)
    repo.close()


def test_rotation_rewraps_session_keys_and_an_old_key_can_then_be_removed(database_url):
    old, new = new_key_text(), new_key_text()
    repo = Repository(database_url, keys=ring(old))
    repo.ensure_tenant("clinic-a")
    before = repo.create_session("clinic-a", PREF)
    repo.add_message(before.id, "user", SECRETS[0])
    with repo.engine.connect() as conn:
        sealed_before = conn.execute(text("SELECT sealed FROM messages")).scalar()
        old_wrapped = tuple(conn.execute(text("SELECT data_key_id, wrapped FROM session_keys")).one())
    repo.close()

    both = Repository(database_url, keys=ring(new, old))  # step 1: new key first, the old one still held
    after = both.create_session("clinic-a", PREF)
    both.add_message(after.id, "user", SECRETS[1])
    assert both.data_key_usage() == {ring(old).current_id: 1, ring(new).current_id: 1}
    assert both.rewrap_session_keys() == 1  # step 2
    assert both.data_key_usage() == {ring(new).current_id: 2}  # the old key's id is forgotten
    with both.engine.connect() as conn:
        assert conn.execute(text("SELECT sealed FROM messages ORDER BY seq")).scalars().first() == sealed_before
    both.close()

    repo = Repository(database_url, keys=ring(new))  # step 3: the old key removed
    assert [m.content for m in repo.list_messages(before.id) + repo.list_messages(after.id)] == SECRETS[:2]
    with pytest.raises(DataKeyError, match=f"data key {ring(old).current_id}, which the test keys does not hold"):
        repo.keys.unwrap(before.id, *old_wrapped)  # a session key from a backup made before the rotation
    repo.close()
    with pytest.raises(DataKeyError, match="not the key the database was written with.*restore it"):
        Repository(database_url, keys=ring(old))


def test_a_wrong_or_malformed_key_is_refused_at_start_up(database_url, monkeypatch):
    Repository(database_url, keys=ring(new_key_text())).close()
    with pytest.raises(DataKeyError, match=r"under data key\(s\) [0-9a-f]{16}, but the test keys hold"):
        Repository(database_url, keys=ring(new_key_text()))
    monkeypatch.setenv(ENV_KEY, "not-a-key")
    with pytest.raises(DataKeyError, match=r"\$ATTUNE_DATA_KEY does not hold a base64-encoded 32-byte key"):
        load_keyring(None)
    monkeypatch.setenv(ENV_KEY, base64.b64encode(b"short").decode())
    with pytest.raises(DataKeyError, match="32-byte"):
        load_keyring(None)


def test_keys_come_from_the_environment_or_a_private_key_file(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    made = load_keyring(tmp_path / "serve" / "data_key")
    path = tmp_path / "serve" / "data_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and load_keyring(path).ids == made.ids  # made once, reused
    a, b = new_key_text(), new_key_text()
    (tmp_path / "mounted").write_text(f"# a mounted secret\n{a}\n{b}\n")
    monkeypatch.setenv(ENV_KEY_FILE, str(tmp_path / "mounted"))
    assert load_keyring(path).ids == ring(a, b).ids
    monkeypatch.setenv(ENV_KEY, f"{b}, {a}")
    assert load_keyring(path).current_id == ring(b).current_id  # the variable wins; its first key is current
    monkeypatch.delenv(ENV_KEY)
    monkeypatch.delenv(ENV_KEY_FILE)
    with pytest.raises(DataKeyError, match="does not exist"):
        load_keyring(tmp_path / "missing", create=False)


def test_a_plaintext_database_is_sealed_in_place_by_the_migration(database_url):
    from tests.serving.test_migrations import _migrate, _old_rows

    _migrate(database_url, "0002")
    sid, = _old_rows(database_url, "clinic-a", 1, {0: SECRETS[0]})
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        mid = conn.execute(text("SELECT id FROM messages")).scalar()
        conn.execute(text("INSERT INTO messages (id, session_id, role, content, created) "
                          "VALUES ('m2', :s, 'assistant', :c, CURRENT_TIMESTAMP)"), {"s": sid, "c": SECRETS[2]})
        conn.execute(text("INSERT INTO feedback (id, session_id, prompt, chosen, rating, message_id, created) "
                          "VALUES ('f1', :s, :p, :c, 'up', 'm2', CURRENT_TIMESTAMP)"),
                     {"s": sid, "p": SECRETS[0], "c": SECRETS[2]})
    engine.dispose()
    keys = ring(new_key_text())
    with pytest.raises(DataKeyError, match="written before encryption at rest"):
        _migrate(database_url, "head")  # no keys: refused, nothing changed

    repo = Repository(database_url, keys=keys)
    assert [(m.id, m.content) for m in repo.list_messages(sid)] == [(mid, SECRETS[0]), ("m2", SECRETS[2])]
    (fb,) = repo.list_feedback(sid)
    assert (fb.prompt, fb.chosen, fb.rejected) == (SECRETS[0], SECRETS[2], None)
    if repo.engine.dialect.name == "postgresql":  # old row versions keep the plaintext until VACUUM FULL (README)
        with repo.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM FULL messages, feedback"))
    assert leaked(raw_dump(repo), SECRETS[:1] + SECRETS[2:3]) == []
    repo.close()


def test_the_cli_adds_a_key_and_rotates_to_it(tmp_path, monkeypatch, capsys):
    for var in (ENV_KEY, ENV_KEY_FILE, "ATTUNE_DATABASE_URL", "ATTUNE_SERVE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / "serve"
    repo = Repository(f"sqlite:///{data / 'attune.db'}", keys=load_keyring(data / "data_key"))
    repo.ensure_tenant("clinic-a")
    s = repo.create_session("clinic-a", PREF)
    repo.add_message(s.id, "user", SECRETS[3])
    old = repo.keys.current_id
    repo.close()

    assert cli.main(["data-key", "new", "--data-dir", str(data)]) == 0
    held = load_keyring(data / "data_key", create=False)
    assert held.ids[1] == old and len(held.ids) == 2
    assert cli.main(["data-key", "rotate", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"rewrapped 1 session keys under data key {held.current_id}" in out and f"old keys {old} removed" in out
    assert load_keyring(data / "data_key", create=False).ids == [held.current_id]
    assert cli.main(["data-key", "status", "--data-dir", str(data)]) == 0
    assert f"{held.current_id}  current  wraps 1 session keys" in capsys.readouterr().out
    repo = Repository(f"sqlite:///{data / 'attune.db'}", keys=load_keyring(data / "data_key", create=False))
    assert [m.content for m in repo.list_messages(s.id)] == [SECRETS[3]]
    repo.close()
    assert SECRETS[3].encode() not in (data / "data_key").read_bytes() + (data / "attune.db").read_bytes()
