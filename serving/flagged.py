"""Sessions a human must see: the operators' list of sessions the crisis protocol flagged (no message text), their
acknowledgement, and opening one flagged session's messages, which is recorded as an audit event.
"""
from __future__ import annotations

from serving.auth import Principal
from serving.db import FLAG_STATUSES, RecordNotFound, Repository
from serving.errors import ApiError, db_call
from serving.sessions_protocol import FlagList, FlagOut, MessageList, MessageOut

LIST_HINT = "GET /v1/admin/flagged lists the flagged sessions (?status=all includes acknowledged ones)"


class FlaggedSessions:
    """The /v1/admin/flagged routes and /v1/admin/sessions/{id}/messages of a ChatService, for operator keys only
    (the routes admit them; this class trusts its principal)."""

    def __init__(self, repo: Repository):
        self.repo = repo

    async def by_status(self, status: str) -> FlagList:
        if status not in FLAG_STATUSES:
            raise ApiError(422, f"status: {status[:40]!r} is not a flag status; use open (not yet acknowledged), "
                           "acknowledged or all", param="status", code="invalid_value")
        flags = await db_call(self.repo.list_flags, status)
        counts = await db_call(self.repo.message_counts, [f.session_id for f in flags])
        return FlagList(status=status, data=[FlagOut.from_row(f, counts[f.session_id]) for f in flags])

    async def acknowledge(self, principal: Principal, session_id: str) -> FlagOut:
        """Mark the flag seen by this operator key; a later flagged turn opens it again."""
        try:
            flag = await db_call(self.repo.acknowledge_flag, session_id, principal.key_id)
        except RecordNotFound:
            raise ApiError(404, f"session {session_id!r} has no flag; {LIST_HINT}", param="session_id",
                           code="flag_not_found") from None
        counts = await db_call(self.repo.message_counts, [session_id])
        return FlagOut.from_row(flag, counts[session_id])

    async def messages(self, principal: Principal, session_id: str) -> MessageList:
        """A flagged session's messages, any tenant's; the opening is audited (key id and count, no text)."""
        session = await db_call(self.repo.find_session, session_id)
        flag = await db_call(self.repo.get_flag, session_id)
        if session is None and flag is None:
            raise ApiError(404, f"no session {session_id!r}; {LIST_HINT}", param="session_id",
                           code="session_not_found")
        if (session is None or session.deleted) or (flag is not None and flag.erased_at is not None):
            raise ApiError(410, f"session {session_id!r} was erased at the patient's request, so its messages are "
                           "gone; its flag record stays in GET /v1/admin/flagged?status=all", param="session_id",
                           code="session_erased")
        if flag is None:
            raise ApiError(403, f"session {session_id!r} is not flagged; an operator key opens only flagged "
                           f"sessions: {LIST_HINT}", type="permission_error", param="session_id",
                           code="session_not_flagged")
        rows = await db_call(self.repo.list_messages, session_id)
        await db_call(self.repo.add_audit, "operator_opened_session", tenant_id=session.tenant_id,
                      session_id=session_id, detail={"key_id": principal.key_id, "messages": len(rows)})
        return MessageList(data=[MessageOut.from_row(r) for r in rows])
