"""Chat sessions for one ingress replica: each belongs to a tenant and is routed to the adapter nearest its
preference (re-routed when the preference changes or the adapter is gone); the chat pipeline's "session and route"
stage (`open_turn`: the patient's message stored, the engine's messages); the session endpoints and feedback.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from adapters.matching import NoRoutableAdapter
from adapters.registry import AdapterStore
from alignment.objectives import Preference, PreferenceError
from alignment.prompts import SYSTEM_PROMPT
from serving.auth import Principal
from serving.config import ServeConfig
from serving.db import CLIENT_GATE, ChatSession, RecordError, RecordNotFound, Repository
from serving.errors import ApiError, db_call
from serving.metrics import ServingMetrics
from serving.protocol import (BASE_ADAPTER, ChatCompletionRequest, FeedbackIn, MessageList, MessageOut, SessionCreate,
                              SessionOut, resolve_preference)
from serving.router import PreferenceRouter
from serving.turn import Turn

log = logging.getLogger("attune.chat")
CHARS_PER_TOKEN = 3
"""Conservative characters per token for trimming history without a tokenizer (the engine checks exactly)."""
MAX_HISTORY = 40


class Sessions:
    """Ownership checks, preference routing, the turns of a chat and the session CRUD of a ChatService."""

    def __init__(self, config: ServeConfig, repo: Repository, store: AdapterStore, router: PreferenceRouter,
                 metrics: ServingMetrics):
        self.config, self.repo, self.store, self.router, self.metrics = config, repo, store, router, metrics

    # ------------------------------------------------------------ routing
    def _profiles(self) -> dict[str, dict[str, float]]:
        return self.store.snapshot().profiles

    async def _routing(self, fn, *args):
        """fn(*args) for routing work: on the event loop when it cannot build a merge (a manifest read and a
        nearest-adapter search, ~0.1 ms, less than a thread hop), in a thread when the merge policy may build one."""
        if self.router.merge_policy:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _resolve(self, value) -> Preference:
        try:
            return resolve_preference(value, self._profiles())
        except PreferenceError as e:
            raise ApiError(422, f"preference: {e}", param="preference", code="invalid_value") from None

    def _resolve_and_route(self, value) -> tuple[Preference, str | None]:
        pref = self._resolve(value)
        return pref, self._route(pref)

    def _route(self, pref: Preference) -> str | None:
        """Adapter id for `pref` (None: no routable adapter, the base model answers)."""
        try:
            decision = self.router.route(pref)
        except NoRoutableAdapter:
            return None
        self.metrics.observe_merge(decision.merge_seconds)
        return decision.adapter_id

    async def pinned(self, adapter: str) -> str | None:
        """The adapter id an operator's attune_options.adapter names; None for the base model."""
        if adapter == BASE_ADAPTER:
            return None
        known = await self._routing(self.store.ids)
        if adapter not in known:
            raise ApiError(422, f"attune_options.adapter: no adapter {adapter!r}; use {BASE_ADAPTER!r} or one of "
                           f"{sorted(known)}", param="attune_options.adapter", code="invalid_value")
        return adapter

    async def safety_adapter(self) -> str | None:
        """The most safety-weighted routable adapter (None: the base model)."""
        try:
            return await self._routing(self.router.safety_adapter_id)
        except NoRoutableAdapter:
            return None

    # ------------------------------------------------------------ sessions
    async def owned(self, principal: Principal, session_id: str) -> ChatSession:
        session = await db_call(self.repo.get_session, principal.tenant_id, session_id)
        if session is None:
            raise ApiError(404, f"no session {session_id!r} for this key; create one with POST /v1/sessions or "
                           "leave session_id out", param="session_id", code="session_not_found")
        return session

    async def plan_new(self, principal: Principal, req: ChatCompletionRequest) -> ChatSession:
        """A new session for a request without session_id, planned, not yet stored (its id is chosen here, so that
        the engine may start before `store_new` writes it)."""
        pref, adapter = await self._routing(self._resolve_and_route, req.preference)
        return ChatSession(id=str(uuid.uuid4()), tenant_id=principal.tenant_id, preference=pref.as_dict(),
                           adapter_id=adapter, locale=self.config.default_locale, flagged=False, deleted=False)

    async def store_new(self, turn: Turn) -> None:
        """Store a turn's new session (planned by open_turn) with its first messages in one transaction; the chat
        pipeline runs this while the early start's engine request begins, and releases nothing of the reply before
        it has returned. A turn in an existing session: nothing to do."""
        if not turn.unstored:
            return
        s = turn.session
        turn.session, _ = await db_call(self.repo.start_session, s.tenant_id, s.preference, s.adapter_id, s.locale,
                                        first_messages(turn.request), session_id=s.id)
        turn.unstored = False

    async def session_for(self, principal: Principal, req: ChatCompletionRequest) -> tuple[ChatSession, str | None]:
        """The request's existing session and its adapter, re-routed only when the preference changes; the session
        keeps its stored history."""
        session = await self.owned(principal, req.session_id)
        known = set(await self._routing(self.store.ids)) - self.router.quarantined
        pref = None if req.preference is None else await self._routing(self._resolve, req.preference)
        if pref is not None and pref != Preference(session.preference):
            adapter = await self._routing(self._route, pref)
            session = await db_call(self.repo.update_session, principal.tenant_id, session.id,
                                    preference=pref.as_dict(), adapter_id=adapter) or session
            return session, adapter
        if session.adapter_id is None or session.adapter_id not in known:
            adapter = await self._routing(self._route, Preference(session.preference))
            if adapter is not None:
                await db_call(self.repo.update_session, principal.tenant_id, session.id, adapter_id=adapter)
            return session, adapter
        return session, session.adapter_id

    async def open_turn(self, principal: Principal, req: ChatCompletionRequest, started: float) -> Turn:
        """Session, route (or an operator's pinned adapter), the patient message and the engine's messages. In an
        existing session the message is stored here; a new session and its messages are stored by `store_new`
        (turn.unstored until then), so that the engine may start first. A request that repeats its session's last
        message, which got no reply (the engine, the database or the connection failed first), is a retry of that
        turn: the stored message is reused, not stored twice."""
        options = req.attune_options
        pin = options is not None and options.adapter is not None
        pinned = await self.pinned(options.adapter) if pin else None
        text = req.messages[-1].content
        if req.session_id is None:
            session = await self.plan_new(principal, req)
            adapter_id = session.adapter_id
            history = [{"role": r, "content": c} for r, c, _ in first_messages(req)][-(MAX_HISTORY + 1):]
        else:
            session, adapter_id = await self.session_for(principal, req)
            rows = await db_call(self.repo.list_messages, session.id, MAX_HISTORY + 1)
            last = rows[-1] if rows else None
            if last is None or (last.role, last.content) != ("user", text):
                rows = [*rows, await db_call(self.repo.add_message, session.id, "user", text)][-(MAX_HISTORY + 1):]
            history = [{"role": m.role, "content": m.content} for m in rows]
        if pin:
            adapter_id = pinned
        messages = engine_messages(history, self.config.engine.max_model_len - req.max_tokens)
        turn = Turn(f"chatcmpl-{uuid.uuid4().hex}", req, principal, session, adapter_id, messages, text, False,
                    started, session.locale or self.config.default_locale, gate=options is None or options.gate,
                    flagged_before=session.flagged, unstored=req.session_id is None,
                    patient_turns=[m["content"] for m in history if m["role"] == "user"])
        if not turn.gate:
            log.info("output gate off for %s (operator request); crisis detection still runs", turn.request_id)
        return turn

    async def create(self, principal: Principal, body: SessionCreate) -> SessionOut:
        pref, adapter = await self._routing(self._resolve_and_route, body.preference)
        return SessionOut.from_row(await db_call(self.repo.create_session, principal.tenant_id, pref.as_dict(),
                                                 adapter, body.locale or self.config.default_locale))

    async def get(self, principal: Principal, session_id: str) -> SessionOut:
        return SessionOut.from_row(await self.owned(principal, session_id))

    async def update(self, principal: Principal, session_id: str, body: SessionCreate) -> SessionOut:
        """Change a session's preference (and so its adapter); the locale is fixed at creation."""
        session = await self.owned(principal, session_id)
        if body.locale is not None:
            raise ApiError(422, "locale is fixed when a session is created; create a new session for another locale",
                           param="locale", code="invalid_value")
        if body.preference is not None:
            pref = await self._routing(self._resolve, body.preference)
            if pref != Preference(session.preference):
                adapter = await self._routing(self._route, pref)
                session = await db_call(self.repo.update_session, principal.tenant_id, session_id,
                                        preference=pref.as_dict(), adapter_id=adapter) or session
        return SessionOut.from_row(session)

    async def messages(self, principal: Principal, session_id: str) -> MessageList:
        await self.owned(principal, session_id)
        rows = await db_call(self.repo.list_messages, session_id)
        return MessageList(data=[MessageOut.from_row(r) for r in rows])

    async def delete(self, principal: Principal, session_id: str) -> dict:
        if not await db_call(self.repo.delete_session, principal.tenant_id, session_id):
            await self.owned(principal, session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    async def feedback(self, principal: Principal, session_id: str, body: FeedbackIn) -> dict:
        await self.owned(principal, session_id)
        try:
            row = await db_call(self.repo.add_feedback, session_id, message_id=body.message_id, rating=body.rating,
                                chosen_message_id=body.chosen_message_id,
                                rejected_message_id=body.rejected_message_id)
        except RecordNotFound as e:
            raise ApiError(404, str(e), param="message_id", code="message_not_found") from None
        except RecordError as e:
            raise ApiError(422, str(e), param="message_id", code="invalid_value") from None
        return {"id": row.id, "object": "feedback", "kind": body.kind, "session_id": session_id}


def first_messages(req: ChatCompletionRequest) -> list[tuple[str, str, str | None]]:
    """A new session's first messages, (role, content, gate) oldest first: the request's earlier user/assistant turns
    (the assistant ones marked client-written, gate "client": not generated or gated here) and its new message.
    Client system messages are never used: Attune's system prompt is fixed."""
    earlier = [(m.role, m.content, CLIENT_GATE if m.role == "assistant" else None)
               for m in req.messages[:-1] if m.role in ("user", "assistant")]
    return [*earlier, ("user", req.messages[-1].content, None)]


def engine_messages(history: list[dict], prompt_tokens: int) -> list[dict]:
    """System prompt + as much recent history as fits `prompt_tokens` + the new message (always kept)."""
    budget = prompt_tokens * CHARS_PER_TOKEN - len(SYSTEM_PROMPT)
    new, kept = history[-1], []
    budget -= len(new["content"])
    for m in reversed(history[:-1]):
        if m["role"] not in ("user", "assistant") or len(m["content"]) > budget:
            break
        kept.append(m)
        budget -= len(m["content"])
    kept.reverse()
    while kept and kept[0]["role"] != "user":
        kept.pop(0)
    return [{"role": "system", "content": SYSTEM_PROMPT}, *kept, new]
