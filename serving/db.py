"""Persistence for tenants, API keys, sessions, messages, feedback and audit events (SQLAlchemy 2).

The tables are serving.records' models (re-exported here), on a SQLite file with WAL by default or PostgreSQL
for clusters; serving.migrations (Alembic) creates and upgrades the schema. Each `Repository` method is one short
transaction, so it is safe from concurrent handlers; no message text is ever logged. Message and feedback text is
stored sealed under its session's key (serving.crypto); the methods take and return plaintext.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from sqlalchemy import create_engine, delete, event, func, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from serving import crypto
from serving.crypto import DataKeyError, KeyRing, SessionCipher  # noqa: F401
from serving.migrations import upgrade as migrate
from serving.records import (ApiKey, AuditEvent, Base, ChatSession, DataKeyId, Feedback, Message,  # noqa: F401
                             SessionFlag, SessionKey, Tenant, UTCDateTime, _now)

Role = Literal["patient-app", "operator"]
ROLES: tuple[str, ...] = ("patient-app", "operator")
TEXT_KEYS = frozenset({"content", "text", "message", "prompt", "reply", "chosen", "rejected"})
MAX_AUDIT_STRING = 200
FLAG_STATUSES: tuple[str, ...] = ("open", "acknowledged", "all")
CATEGORY_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
CLIENT_GATE = "client"
"""Message.gate of an assistant turn the client wrote in a new session's request history (never generated here)."""


class RecordNotFound(LookupError):
    """No such session or message for this tenant (the API answers 404, revealing nothing else)."""


class RecordError(ValueError):
    """A write the store refuses; the message says what to change."""


def _merge_detector(old: str, new: str | None) -> str:
    """The detectors that fired over all of a session's flagged turns: "rules" and "model" together are "both"."""
    parts = {p for d in (old, new) if d and d != "unknown" for p in (("rules", "model") if d == "both" else (d,))}
    return "both" if parts == {"rules", "model"} else "+".join(sorted(parts))[:64] or "unknown"


def _check_names(detector: str | None, categories) -> list[str]:
    """The categories as a list, after checking that they and the detector are names, not text."""
    names = [categories] if isinstance(categories, str) else list(categories or ())
    bad = [str(c)[:40] for c in [*names, *([detector] if detector is not None else [])]
           if not isinstance(c, str) or not CATEGORY_NAME.match(c)]
    if bad:
        raise RecordError(f"{bad} are not detector, rule or category names (1-64 letters, digits or '_.:-'); a "
                          "flag record never holds message text")
    return names


def _check_audit_detail(value: Any, path: str = "detail") -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if str(k).lower() in TEXT_KEYS:
                raise RecordError(f"{path}.{k}: audit events must not carry message text; store ids or counts")
            _check_audit_detail(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_audit_detail(v, f"{path}[{i}]")
    elif isinstance(value, str) and len(value) > MAX_AUDIT_STRING:
        raise RecordError(f"{path} is {len(value)} characters; audit strings are capped at {MAX_AUDIT_STRING} "
                          "so that no message text lands in the audit log")


def _finite_scores(scores: Mapping[str, float] | None) -> dict[str, float] | None:
    if scores is None:
        return None
    out = {str(k): float(v) for k, v in scores.items()}
    bad = sorted(k for k, v in out.items() if not math.isfinite(v))
    if bad:
        raise RecordError(f"scores for {bad} are not finite numbers; store finite scores or none")
    return out


def _switch_to_wal(cur, deadline_s: float = 30.0) -> None:
    """PRAGMA journal_mode=WAL, retried: switching needs the file to itself, and SQLite answers "database is locked"
    at once (without its busy handler) while another connection opening the same new file holds a lock. Once the
    file is in WAL mode the pragma returns at once."""
    import sqlite3
    import time

    end = time.monotonic() + deadline_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > end:
                raise
            time.sleep(0.05)


class Repository:
    """All reads and writes. Synchronous: call it from a thread pool in async handlers.

    `sqlite://` (in memory) is for single-threaded tests; use a file or PostgreSQL when serving.
    """

    def __init__(self, url: str, *, keys: KeyRing | None = None, create_tables: bool = True):
        """`keys`: the data keys (serving.crypto; None: crypto.default_keyring(url)); the database must know no
        other (DataKeyError otherwise). `create_tables`: migrate the schema to the newest revision
        (serving.migrations; safe when several replicas open one database at once); False uses the database as it
        is."""
        self.keys = keys if keys is not None else crypto.default_keyring(url)
        parsed = make_url(url)
        kwargs: dict[str, Any] = {"hide_parameters": True}  # errors never echo bound values (message text)
        if parsed.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if parsed.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool
            else:
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(url, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            self._sqlite_pragmas()
        self._tx = sessionmaker(self.engine, expire_on_commit=False)
        if create_tables:
            migrate(self.engine, self.keys)
            self._checkpoint()  # a migration that sealed old text leaves no plaintext page in the file
        else:
            self._register_keys()

    def _register_keys(self) -> None:
        with self.engine.connect() as conn:
            if "data_keys" in inspect(conn).get_table_names():
                crypto.register(conn, self.keys)
                conn.commit()

    # ------------------------------------------------------------ session keys
    def _cipher(self, s, session_id: str, *, create: bool = False) -> SessionCipher | None:
        """The session's cipher, from its wrapped key; None when it has none (erased, or never written to),
        unless `create` gives it one."""
        row = s.get(SessionKey, session_id)
        if row is not None:
            return self.keys.unwrap(session_id, row.data_key_id, row.wrapped)
        if not create:
            return None
        kid, wrapped, cipher = self.keys.new_session_key(session_id)
        s.add(SessionKey(session_id=session_id, data_key_id=kid, wrapped=wrapped))
        return cipher

    def _ciphers(self, s, session_ids) -> dict[str, SessionCipher]:
        ids, out = sorted(set(session_ids)), {}
        for i in range(0, len(ids), 500):  # SQLite caps the bound parameters of one statement
            for row in s.scalars(select(SessionKey).where(SessionKey.session_id.in_(ids[i:i + 500]))):
                out[row.session_id] = self.keys.unwrap(row.session_id, row.data_key_id, row.wrapped)
        return out

    @staticmethod
    def _open_message(cipher: SessionCipher | None, row: Message) -> Message:
        if cipher is None:
            raise DataKeyError(f"session {row.session_id!r} has messages but no session key, so they cannot be "
                               "read; was its key row deleted outside Repository.delete_session?")
        row.content = cipher.open("message", row.id, row.sealed)
        return row

    @staticmethod
    def _open_feedback(cipher: SessionCipher | None, row: Feedback) -> Feedback:
        if cipher is None:
            raise DataKeyError(f"session {row.session_id!r} has feedback but no session key, so it cannot be read")
        texts = json.loads(cipher.open("feedback", row.id, row.sealed))
        row.prompt, row.chosen, row.rejected = texts["prompt"], texts["chosen"], texts["rejected"]
        return row

    def data_key_usage(self) -> dict[str, int]:
        """{data key id: session keys wrapped under it}, every id the database knows included (0 when unused)."""
        with self._tx.begin() as s:
            usage = dict.fromkeys(s.scalars(select(DataKeyId.id)).all(), 0)
            usage.update(s.execute(select(SessionKey.data_key_id, func.count()).group_by(SessionKey.data_key_id))
                         .tuples().all())
            return usage

    def rewrap_session_keys(self, batch: int = 500) -> int:
        """Wrap every session key under the current data key (the sealed text is not touched), then forget the ids
        of data keys no session key uses any more. Returns how many were rewrapped."""
        done, current = 0, self.keys.current_id
        while True:
            with self._tx.begin() as s:
                rows = s.scalars(select(SessionKey).where(SessionKey.data_key_id != current)
                                 .order_by(SessionKey.session_id).limit(batch).with_for_update()).all()
                for row in rows:
                    row.wrapped = self.keys.rewrap(row.session_id, row.data_key_id, row.wrapped)
                    row.data_key_id = current
            done += len(rows)
            if len(rows) < batch:
                break
        with self._tx.begin() as s:
            used = select(SessionKey.data_key_id).distinct()
            s.execute(delete(DataKeyId).where(DataKeyId.id != current, DataKeyId.id.not_in(used)))
        return done

    def _sqlite_pragmas(self) -> None:
        @event.listens_for(self.engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            _switch_to_wal(cur)
            for pragma in ("synchronous=NORMAL", "foreign_keys=ON", "secure_delete=ON"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _begin(conn):
            # A deferred transaction that reads then writes cannot wait for the lock: take it up front.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    # ------------------------------------------------------------ tenants and keys
    def ensure_tenant(self, tenant_id: str, name: str | None = None) -> str:
        with self._tx.begin() as s:
            if s.get(Tenant, tenant_id) is None:
                s.add(Tenant(id=tenant_id, name=name or tenant_id))
        return tenant_id

    def put_api_key(self, tenant_id: str, key_hash: str, role: Role, label: str = "") -> ApiKey:
        """Insert the key, or re-activate it (with `label`) if this tenant and role already hold it."""
        with self._tx.begin() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
            if row is None:
                if role not in ROLES or s.get(Tenant, tenant_id) is None:
                    raise RecordError(f"need an existing tenant and a role in {list(ROLES)}")
                row = ApiKey(key_hash=key_hash, tenant_id=tenant_id, role=role, label=label)
                s.add(row)
            elif (row.tenant_id, row.role) != (tenant_id, role):
                raise RecordError(f"this key is registered for tenant {row.tenant_id!r} as {row.role}; "
                                  "use a different key")
            else:
                row.revoked, row.label = False, label
            s.flush()
            return row

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        with self._tx.begin() as s:
            return s.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked.is_(False)))

    def revoke_api_keys(self, tenant_id: str, label: str, keep_hash: str | None = None) -> int:
        """Revoke the tenant's keys with `label`, except `keep_hash`; returns how many."""
        with self._tx.begin() as s:
            q = update(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.label == label,
                                     ApiKey.revoked.is_(False))
            if keep_hash is not None:
                q = q.where(ApiKey.key_hash != keep_hash)
            return s.execute(q.values(revoked=True)).rowcount

    # ------------------------------------------------------------ sessions
    def create_session(self, tenant_id: str, preference: Mapping[str, float], adapter_id: str | None = None,
                       locale: str = "en") -> ChatSession:
        return self.start_session(tenant_id, preference, adapter_id, locale)[0]

    def start_session(self, tenant_id: str, preference: Mapping[str, float], adapter_id: str | None = None,
                      locale: str = "en", messages: Sequence[tuple[str, str, str | None]] = (),
                      session_id: str | None = None) -> tuple[ChatSession, list[Message]]:
        """A new session and its first messages ((role, content, gate), oldest first) in one transaction: a chat
        that starts with a request is stored whole or not at all, in one commit. `session_id`: an id the caller
        chose (a new uuid4 when None)."""
        with self._tx.begin() as s:
            row = ChatSession(id=session_id or str(uuid.uuid4()), tenant_id=tenant_id, preference=dict(preference),
                              adapter_id=adapter_id, locale=locale)
            s.add(row)
            s.flush()
            cipher = self._cipher(s, row.id, create=True)
            stored = [self._new_message(s, cipher, row.id, role, content, gate=gate) for role, content, gate in messages]
            s.flush()
            return row, stored

    def _owned(self, s, tenant_id: str, session_id: str) -> ChatSession | None:
        row = s.get(ChatSession, session_id)
        return row if row is not None and row.tenant_id == tenant_id and not row.deleted else None

    def get_session(self, tenant_id: str, session_id: str) -> ChatSession | None:
        """The session, or None if it does not exist, was deleted, or belongs to another tenant."""
        with self._tx.begin() as s:
            return self._owned(s, tenant_id, session_id)

    def update_session(self, tenant_id: str, session_id: str, *, preference: Mapping[str, float] | None = None,
                       adapter_id: str | None = None) -> ChatSession | None:
        with self._tx.begin() as s:
            row = self._owned(s, tenant_id, session_id)
            if row is None:
                return None
            if preference is not None:
                row.preference = dict(preference)
            if adapter_id is not None:
                row.adapter_id = adapter_id
            s.flush()
            return row

    def flag_session(self, session_id: str, *, detector: str | None = None,
                     categories: list[str] | tuple[str, ...] | None = None) -> SessionFlag | None:
        """Mark the session flagged and count one more flagged turn in its SessionFlag (created on the first; a new
        turn reopens an acknowledged flag). `categories` are rule or category names, never text. None: no session."""
        names, now = _check_names(detector, categories), _now()
        with self._tx.begin() as s:
            sess = s.get(ChatSession, session_id, with_for_update=True)  # one flagger per session at a time
            if sess is None:
                return None
            sess.flagged = True
            flag = s.scalar(select(SessionFlag).where(SessionFlag.session_id == session_id))
            if flag is None:
                flag = SessionFlag(session_id=session_id, tenant_id=sess.tenant_id, flagged_turns=0, categories=[],
                                   detector="unknown", first_flagged_at=now)
                s.add(flag)
            flag.flagged_turns += 1
            flag.last_flagged_at = now
            flag.detector = _merge_detector(flag.detector, detector)
            flag.categories = sorted(set(flag.categories) | set(names))
            flag.acknowledged_at = flag.acknowledged_by = None
            s.flush()
            return flag

    def get_flag(self, session_id: str) -> SessionFlag | None:
        with self._tx.begin() as s:
            return s.scalar(select(SessionFlag).where(SessionFlag.session_id == session_id))

    def list_flags(self, status: str = "open", tenant_id: str | None = None) -> list[SessionFlag]:
        """Flags by status ("open": not acknowledged, erased or not), most recently flagged first."""
        if status not in FLAG_STATUSES:
            raise RecordError(f"status {status!r} is unknown; use one of {list(FLAG_STATUSES)}")
        q = select(SessionFlag).order_by(SessionFlag.last_flagged_at.desc(), SessionFlag.id.desc())
        if status == "open":
            q = q.where(SessionFlag.acknowledged_at.is_(None))
        elif status == "acknowledged":
            q = q.where(SessionFlag.acknowledged_at.is_not(None))
        if tenant_id is not None:
            q = q.where(SessionFlag.tenant_id == tenant_id)
        with self._tx.begin() as s:
            return list(s.scalars(q).all())

    def acknowledge_flag(self, session_id: str, by: int) -> SessionFlag:
        """A human has seen the flag (`by`: the operator's key id); acknowledging twice keeps the first."""
        with self._tx.begin() as s:
            flag = s.scalar(select(SessionFlag).where(SessionFlag.session_id == session_id).with_for_update())
            if flag is None:
                raise RecordNotFound(f"session {session_id!r} has no flag")
            if flag.acknowledged_at is None:
                flag.acknowledged_at, flag.acknowledged_by = _now(), by
                s.add(AuditEvent(tenant_id=flag.tenant_id, session_id=session_id, kind="flag_acknowledged",
                                 detail={"key_id": by, "flagged_turns": flag.flagged_turns}))
            s.flush()
            return flag

    def find_session(self, session_id: str) -> ChatSession | None:
        """Any tenant's session, erased ones included: for operators, who check `deleted` themselves."""
        with self._tx.begin() as s:
            return s.get(ChatSession, session_id)

    def delete_session(self, tenant_id: str, session_id: str) -> bool:
        """Erase the session's messages, feedback and key (so no copy of its sealed text can be opened again); keep
        a tombstone, its flag (marked erased) and an audit event without content."""
        with self._tx.begin() as s:
            row = self._owned(s, tenant_id, session_id)
            if row is None:
                return False
            n_feedback = s.execute(delete(Feedback).where(Feedback.session_id == session_id)).rowcount
            n_messages = s.execute(delete(Message).where(Message.session_id == session_id)).rowcount
            s.execute(delete(SessionKey).where(SessionKey.session_id == session_id))
            row.deleted = True
            s.execute(update(SessionFlag).where(SessionFlag.session_id == session_id).values(erased_at=_now()))
            s.add(AuditEvent(tenant_id=tenant_id, session_id=session_id, kind="session_deleted",
                             detail={"messages_erased": n_messages, "feedback_erased": n_feedback}))
        self._checkpoint()
        return True

    def _checkpoint(self) -> None:
        """On SQLite, copy the WAL into the file and empty it: secure_delete has zeroed the freed and rewritten
        cells in the WAL's pages, and the checkpoint replaces their old images in the file."""
        if self.engine.dialect.name == "sqlite":
            raw = self.engine.raw_connection()
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()

    # ------------------------------------------------------------ messages
    def add_message(self, session_id: str, role: str, content: str, *, adapter_id: str | None = None,
                    scores: Mapping[str, float] | None = None, gate: str | None = None) -> Message:
        """Store and commit at once, so a crash later loses nothing already said."""
        with self._tx.begin() as s:
            sess = s.get(ChatSession, session_id)
            if sess is None or sess.deleted:
                raise RecordNotFound(f"session {session_id!r} does not exist")
            row = self._new_message(s, self._cipher(s, session_id, create=True), session_id, role, content,
                                    adapter_id=adapter_id, scores=scores, gate=gate)
            s.flush()
            return row

    @staticmethod
    def _new_message(s, cipher: SessionCipher, session_id: str, role: str, content: str, *,
                     adapter_id: str | None = None, scores: Mapping[str, float] | None = None,
                     gate: str | None = None) -> Message:
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"role {role!r} is unknown; use system, user or assistant")
        mid = str(uuid.uuid4())
        row = Message(id=mid, session_id=session_id, role=role, sealed=cipher.seal("message", mid, content),
                      adapter_id=adapter_id, scores=_finite_scores(scores), gate=gate)
        s.add(row)  # rows added in one flush are inserted in order, so seq follows the order of the calls
        row.content = content
        return row

    def list_messages(self, session_id: str, limit: int | None = None) -> list[Message]:
        """Oldest first; with `limit`, the most recent `limit` messages."""
        with self._tx.begin() as s:
            q = select(Message).where(Message.session_id == session_id).order_by(Message.seq.desc())
            rows = s.scalars(q.limit(limit) if limit is not None else q).all()
            cipher = self._cipher(s, session_id) if rows else None
            return [self._open_message(cipher, r) for r in reversed(rows)]

    # ------------------------------------------------------------ feedback
    def add_feedback(self, session_id: str, *, message_id: str | None = None, rating: str | None = None,
                     chosen_message_id: str | None = None,
                     rejected_message_id: str | None = None) -> Feedback:
        """A thumb on one reply, or a choice between two replies to the same user message."""
        with self._tx.begin() as s:
            cipher = self._cipher(s, session_id)

            def reply(mid: str) -> tuple[Message, str]:
                msg = s.scalar(select(Message).where(Message.id == mid, Message.session_id == session_id))
                if msg is None:
                    raise RecordNotFound(f"message {mid!r} is not in session {session_id!r}")
                self._open_message(cipher, msg)
                if msg.role != "assistant":
                    raise RecordError(f"message {mid!r} is a {msg.role} message; feedback rates assistant replies")
                if msg.gate == CLIENT_GATE:
                    raise RecordError(f"message {mid!r} was written by the client, not generated here; feedback "
                                      "rates this service's replies")
                prompt = s.scalar(select(Message).where(
                    Message.session_id == session_id, Message.role == "user", Message.seq < msg.seq,
                ).order_by(Message.seq.desc()).limit(1))
                if prompt is None:
                    raise RecordError(f"message {mid!r} has no user message before it to pair with")
                return msg, self._open_message(cipher, prompt).content

            if message_id is not None and rating in ("up", "down"):
                msg, prompt = reply(message_id)
                row = Feedback(session_id=session_id, prompt=prompt, rating=rating, message_id=message_id,
                               adapter_id=msg.adapter_id, chosen=msg.content if rating == "up" else None,
                               rejected=msg.content if rating == "down" else None)
            elif chosen_message_id and rejected_message_id and chosen_message_id != rejected_message_id:
                chosen, prompt = reply(chosen_message_id)
                rejected, other_prompt = reply(rejected_message_id)
                if prompt != other_prompt:
                    raise RecordError("the two replies answer different user messages; choose between "
                                      "replies to the same message")
                row = Feedback(session_id=session_id, prompt=prompt, chosen=chosen.content,
                               rejected=rejected.content, chosen_message_id=chosen_message_id,
                               rejected_message_id=rejected_message_id, adapter_id=chosen.adapter_id)
            else:
                raise RecordError("give message_id with rating 'up'/'down', or two different "
                                  "chosen_message_id and rejected_message_id")
            row.id = str(uuid.uuid4())
            row.sealed = cipher.seal("feedback", row.id, json.dumps(
                {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected}))
            s.add(row)
            s.flush()
            return row

    def list_feedback(self, session_id: str | None = None) -> list[Feedback]:
        with self._tx.begin() as s:
            q = select(Feedback).order_by(Feedback.created)
            if session_id is not None:
                q = q.where(Feedback.session_id == session_id)
            rows = s.scalars(q).all()
            ciphers = self._ciphers(s, [r.session_id for r in rows])
            return [self._open_feedback(ciphers.get(r.session_id), r) for r in rows]

    # ------------------------------------------------------------ audit
    def add_audit(self, kind: str, *, tenant_id: str | None = None, session_id: str | None = None,
                  detail: Mapping[str, Any] | None = None) -> AuditEvent:
        """Record an event such as crisis_protocol or gate_fallback; `detail` holds ids, scores, counts only."""
        detail = dict(detail or {})
        _check_audit_detail(detail)
        with self._tx.begin() as s:
            row = AuditEvent(tenant_id=tenant_id, session_id=session_id, kind=kind, detail=detail)
            s.add(row)
            s.flush()
            return row

    def list_audit(self, kind: str | None = None, session_id: str | None = None) -> list[AuditEvent]:
        with self._tx.begin() as s:
            q = select(AuditEvent).order_by(AuditEvent.id)
            if kind is not None:
                q = q.where(AuditEvent.kind == kind)
            if session_id is not None:
                q = q.where(AuditEvent.session_id == session_id)
            return list(s.scalars(q).all())

    # ------------------------------------------------------------ counts
    def _count(self, model, *where) -> int:
        with self._tx.begin() as s:
            return s.scalar(select(func.count()).select_from(model).where(*where)) or 0

    def count_sessions(self, tenant_id: str | None = None, flagged: bool | None = None) -> int:
        where = [ChatSession.deleted.is_(False)]
        if tenant_id is not None:
            where.append(ChatSession.tenant_id == tenant_id)
        if flagged is not None:
            where.append(ChatSession.flagged.is_(flagged))
        return self._count(ChatSession, *where)

    def count_messages(self, session_id: str | None = None) -> int:
        return self._count(Message, *([Message.session_id == session_id] if session_id else []))

    def message_counts(self, session_ids: list[str]) -> dict[str, int]:
        """{session id: messages stored} for each of `session_ids` (0 when erased or empty)."""
        counts = dict.fromkeys(session_ids, 0)
        with self._tx.begin() as s:
            for i in range(0, len(session_ids), 500):  # SQLite caps the bound parameters of one statement
                chunk = session_ids[i:i + 500]
                counts.update(s.execute(select(Message.session_id, func.count()).where(
                    Message.session_id.in_(chunk)).group_by(Message.session_id)).tuples().all())
        return counts

    def count_feedback(self, session_id: str | None = None) -> int:
        return self._count(Feedback, *([Feedback.session_id == session_id] if session_id else []))

    def count_audit(self, kind: str | None = None) -> int:
        return self._count(AuditEvent, *([AuditEvent.kind == kind] if kind else []))
