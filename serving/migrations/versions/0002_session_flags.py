"""Session flags: one text-free record per session the crisis protocol fired in, kept after the session's erasure.

Sessions flagged before this revision get their record from their crisis_protocol audit events (how many, the first
and last time, the detectors and the rule names) and, if erased since, the time of their session_deleted event.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)
NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def upgrade() -> None:
    flags = op.create_table(
        "session_flags",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(36), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("first_flagged_at", UTC_DATETIME, nullable=False),
        sa.Column("last_flagged_at", UTC_DATETIME, nullable=False),
        sa.Column("flagged_turns", sa.Integer(), nullable=False),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("acknowledged_at", UTC_DATETIME, nullable=True),
        sa.Column("acknowledged_by", sa.Integer(), nullable=True),
        sa.Column("erased_at", UTC_DATETIME, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_session_flags_session_id", "session_flags", ["session_id"], unique=True)
    op.create_index("ix_session_flags_tenant_id", "session_flags", ["tenant_id"])
    rows = _flags_of_flagged_sessions(op.get_bind())
    if rows:
        op.bulk_insert(flags, rows)


def _flags_of_flagged_sessions(conn) -> list[dict]:
    sessions = sa.table("sessions", sa.column("id", sa.String), sa.column("tenant_id", sa.String),
                        sa.column("flagged", sa.Boolean), sa.column("deleted", sa.Boolean),
                        sa.column("created", UTC_DATETIME))
    audit = sa.table("audit_events", sa.column("session_id", sa.String), sa.column("kind", sa.String),
                     sa.column("detail", sa.JSON), sa.column("created", UTC_DATETIME))
    flagged = conn.execute(sa.select(sessions).where(sessions.c.flagged.is_(True))).mappings().all()
    if not flagged:
        return []
    events: dict[str, list] = {}
    for e in conn.execute(sa.select(audit).where(audit.c.kind.in_(("crisis_protocol", "session_deleted")))
                          .order_by(audit.c.created)).mappings():
        events.setdefault(e["session_id"], []).append(e)
    rows = []
    for s in flagged:
        crisis = [e for e in events.get(s["id"], []) if e["kind"] == "crisis_protocol"]
        deleted = [e["created"] for e in events.get(s["id"], []) if e["kind"] == "session_deleted"]
        details = [e["detail"] if isinstance(e["detail"], dict) else {} for e in crisis]
        rules = sorted({r for d in details for r in (d.get("rules") or []) if isinstance(r, str) and NAME.match(r)})
        by = {"rules"} if any(d.get("rules") for d in details) else set()
        by |= {"model"} if any(d.get("by_model") for d in details) else set()
        times = [e["created"] for e in crisis] or [s["created"]]
        rows.append({"session_id": s["id"], "tenant_id": s["tenant_id"], "first_flagged_at": times[0],
                     "last_flagged_at": times[-1], "flagged_turns": max(1, len(crisis)),
                     "detector": "both" if len(by) == 2 else (by.pop() if by else "unknown"), "categories": rules,
                     "erased_at": (deleted[-1] if deleted else datetime.now(timezone.utc)) if s["deleted"] else None})
    return rows


def downgrade() -> None:
    op.drop_index("ix_session_flags_tenant_id", table_name="session_flags")
    op.drop_index("ix_session_flags_session_id", table_name="session_flags")
    op.drop_table("session_flags")
