"""The tables behind `serving.db.Repository` (SQLAlchemy 2 declarative models), in portable types only.

Alembic (serving.migrations) creates and upgrades them; change a model here only together with a new revision.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, LargeBinary, String, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alignment.data import PreferencePair


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _uuid() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite returns naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    """Rows come back from `Repository` detached: read them freely, change them through its methods."""

    type_annotation_map = {datetime: UTCDateTime}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created: Mapped[datetime] = mapped_column(default=_now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(64), default="")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(default=_now)


class ChatSession(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    preference: Mapped[dict] = mapped_column(JSON)
    adapter_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    locale: Mapped[str] = mapped_column(String(35), default="en")
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(default=_now)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class DataKeyId(Base):
    """A data key the session keys may be wrapped under, by its id (serving.crypto.key_id): never the key."""

    __tablename__ = "data_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created: Mapped[datetime] = mapped_column(default=_now)


class SessionKey(Base):
    """A session's own key, wrapped (AES-GCM) under data key `data_key_id`; erasure deletes it."""

    __tablename__ = "session_keys"
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), primary_key=True)
    data_key_id: Mapped[str] = mapped_column(ForeignKey("data_keys.id"), index=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[datetime] = mapped_column(default=_now)


class Message(Base):
    """`sealed` is `content` encrypted under the session's key; `content`, a plain attribute, is the text the
    Repository opened (rows it returns always have it)."""

    __tablename__ = "messages"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, index=True, default=_uuid)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    adapter_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    scores: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    gate: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created: Mapped[datetime] = mapped_column(default=_now)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    content = None


class Feedback(Base):
    """One row of the alignment feedback schema: a (prompt, chosen, rejected) pair, or a thumb on one reply.
    `sealed` holds the three texts encrypted under the session's key; `prompt`, `chosen` and `rejected`, plain
    attributes, are those the Repository opened."""

    __tablename__ = "feedback"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)
    message_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    chosen_message_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    rejected_message_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    adapter_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created: Mapped[datetime] = mapped_column(default=_now)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    prompt = chosen = rejected = None

    def to_pair(self, objective: str) -> PreferencePair | None:
        """A choice as an alignment preference pair for `objective` (a thumb alone is not a pair)."""
        if self.chosen is None or self.rejected is None:
            return None
        return PreferencePair(self.prompt, self.chosen, self.rejected, objective, 1.0, f"feedback:{self.id}")


class AuditEvent(Base):
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    session_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[dict] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(default=_now)


class SessionFlag(Base):
    """A session the crisis protocol fired in, waiting for a human. No message text and no foreign key: it outlives
    the session's erasure, which only sets `erased_at`."""

    __tablename__ = "session_flags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(36), unique=True, index=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    first_flagged_at: Mapped[datetime] = mapped_column(default=_now)
    last_flagged_at: Mapped[datetime] = mapped_column(default=_now)
    flagged_turns: Mapped[int] = mapped_column(Integer, default=1)
    detector: Mapped[str] = mapped_column(String(64), default="unknown")
    """Which detectors fired over the flagged turns: "rules", "model", "both", another name, or "unknown"."""
    categories: Mapped[list] = mapped_column(JSON, default=list)
    """Names of the crisis rules or categories that fired (never text)."""
    acknowledged_at: Mapped[datetime | None] = mapped_column(nullable=True)
    acknowledged_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The id of the operator key that acknowledged it."""
    erased_at: Mapped[datetime | None] = mapped_column(nullable=True)
