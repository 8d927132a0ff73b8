"""Encryption at rest: data key ids (data_keys), one wrapped key per session (session_keys), and message and feedback
text sealed into `sealed` columns in place of the plaintext ones (see serving.crypto).

Rows written before this revision are sealed in place, under session keys wrapped by the data keys the Repository
runs with (alembic_config(..., keys=...)); each plaintext value is blanked in the same UPDATE, so the live row
versions hold none. Downgrading opens them again with the same keys.

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import context, op

from serving.crypto import SESSION_KEYS, DataKeyError, KeyRing, register

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)
BATCH = 500
SESSIONS = sa.table("sessions", sa.column("id", sa.String), sa.column("deleted", sa.Boolean))
MESSAGES = sa.table("messages", sa.column("seq", sa.Integer), sa.column("id", sa.String),
                    sa.column("session_id", sa.String), sa.column("content", sa.Text),
                    sa.column("sealed", sa.LargeBinary))
FEEDBACK = sa.table("feedback", sa.column("id", sa.String), sa.column("session_id", sa.String),
                    sa.column("prompt", sa.Text), sa.column("chosen", sa.Text), sa.column("rejected", sa.Text),
                    sa.column("sealed", sa.LargeBinary))


def upgrade() -> None:
    ring = _keys(op.get_bind())  # before any change: refused without keys when there is text to seal
    op.create_table(
        "data_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "session_keys",
        sa.Column("session_id", sa.String(36), nullable=False),
        sa.Column("data_key_id", sa.String(32), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"]),
        sa.ForeignKeyConstraint(["data_key_id"], ["data_keys.id"]),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_index("ix_session_keys_data_key_id", "session_keys", ["data_key_id"])
    op.add_column("messages", sa.Column("sealed", sa.LargeBinary(), nullable=True))
    op.add_column("feedback", sa.Column("sealed", sa.LargeBinary(), nullable=True))
    if ring is not None:
        _seal_existing(op.get_bind(), ring)
    with op.batch_alter_table("messages") as b:
        b.drop_column("content")
        b.alter_column("sealed", existing_type=sa.LargeBinary(), nullable=False)
    with op.batch_alter_table("feedback") as b:
        for name in ("prompt", "chosen", "rejected"):
            b.drop_column(name)
        b.alter_column("sealed", existing_type=sa.LargeBinary(), nullable=False)


def _keys(conn) -> KeyRing | None:
    """The Repository's data keys; None when it gave none and there is no text to seal or open."""
    ring = context.config.attributes.get("keys")
    needed = ring is None and (conn.execute(sa.select(sa.func.count()).select_from(MESSAGES)).scalar() or
                               conn.execute(sa.select(sa.func.count()).select_from(FEEDBACK)).scalar())
    if needed:
        raise DataKeyError("this database holds messages or feedback written before encryption at rest; migrate it "
                           "through serving.db.Repository (or alembic_config(conn, keys=...)) so they are sealed "
                           "with the service's data key")
    return ring


def _batches(conn, key, *columns):
    """Rows (`key`, *`columns`) in order of `key`, BATCH at a time (the table is being rewritten meanwhile)."""
    last = None
    while True:
        q = sa.select(key, *columns).order_by(key).limit(BATCH)
        rows = conn.execute(q if last is None else q.where(key > last)).all()
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def _seal_existing(conn, ring: KeyRing) -> None:
    register(conn, ring)
    now, ciphers = datetime.now(timezone.utc), {}
    for (sid,) in conn.execute(sa.select(SESSIONS.c.id).where(SESSIONS.c.deleted.is_(False))).all():
        kid, wrapped, ciphers[sid] = ring.new_session_key(sid)
        conn.execute(sa.insert(SESSION_KEYS).values(session_id=sid, data_key_id=kid, wrapped=wrapped, created=now))

    def cipher(sid: str):
        if sid not in ciphers:  # text left in an erased session (none should be): give it a key all the same
            kid, wrapped, ciphers[sid] = ring.new_session_key(sid)
            conn.execute(sa.insert(SESSION_KEYS).values(session_id=sid, data_key_id=kid, wrapped=wrapped,
                                                        created=now))
        return ciphers[sid]

    m = MESSAGES.c
    for rows in _batches(conn, m.seq, m.id, m.session_id, m.content):
        for seq, mid, sid, content in rows:
            conn.execute(sa.update(MESSAGES).where(m.seq == seq).values(
                sealed=cipher(sid).seal("message", mid, content), content=""))
    f = FEEDBACK.c
    for rows in _batches(conn, f.id, f.session_id, f.prompt, f.chosen, f.rejected):
        for fid, sid, prompt, chosen, rejected in rows:
            texts = json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            conn.execute(sa.update(FEEDBACK).where(f.id == fid).values(
                sealed=cipher(sid).seal("feedback", fid, texts), prompt="", chosen=None, rejected=None))


def downgrade() -> None:
    ring = _keys(op.get_bind())
    with op.batch_alter_table("messages") as b:
        b.add_column(sa.Column("content", sa.Text(), nullable=True))
        b.alter_column("sealed", existing_type=sa.LargeBinary(), nullable=True)
    with op.batch_alter_table("feedback") as b:
        for name in ("prompt", "chosen", "rejected"):
            b.add_column(sa.Column(name, sa.Text(), nullable=True))
        b.alter_column("sealed", existing_type=sa.LargeBinary(), nullable=True)
    if ring is not None:
        _open_existing(op.get_bind(), ring)
    with op.batch_alter_table("messages") as b:
        b.drop_column("sealed")
        b.alter_column("content", existing_type=sa.Text(), nullable=False)
    with op.batch_alter_table("feedback") as b:
        b.drop_column("sealed")
        b.alter_column("prompt", existing_type=sa.Text(), nullable=False)
    op.drop_index("ix_session_keys_data_key_id", table_name="session_keys")
    op.drop_table("session_keys")
    op.drop_table("data_keys")


def _open_existing(conn, ring: KeyRing) -> None:
    k = SESSION_KEYS.c
    wrapped = {sid: (kid, w) for sid, kid, w in conn.execute(sa.select(k.session_id, k.data_key_id, k.wrapped))}
    ciphers: dict = {}

    def cipher(sid: str):
        if sid not in ciphers:
            if sid not in wrapped:
                raise DataKeyError(f"session {sid!r} has text but no session key; it cannot be decrypted")
            ciphers[sid] = ring.unwrap(sid, *wrapped[sid])
        return ciphers[sid]

    m = MESSAGES.c
    for rows in _batches(conn, m.seq, m.id, m.session_id, m.sealed):
        for seq, mid, sid, sealed in rows:
            conn.execute(sa.update(MESSAGES).where(m.seq == seq).values(
                content=cipher(sid).open("message", mid, sealed)))
    f = FEEDBACK.c
    for rows in _batches(conn, f.id, f.session_id, f.sealed):
        for fid, sid, sealed in rows:
            conn.execute(sa.update(FEEDBACK).where(f.id == fid).values(
                **json.loads(cipher(sid).open("feedback", fid, sealed))))
