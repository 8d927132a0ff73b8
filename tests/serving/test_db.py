"""The SQL store: order, tenant isolation, erasure that leaves no text behind (but keeps the session's flag record),
feedback ownership, flag records that count turns and survive erasure. Every test that takes `repo` runs on SQLite
and on a real PostgreSQL server (tests/pg.py)."""
from __future__ import annotations

import json
import shutil
import threading

import pytest
from sqlalchemy import text

from serving.db import Base, RecordError, RecordNotFound, Repository

PREF = {"empathy": 0.5, "safety": 0.5}


@pytest.fixture()
def repo(database_url):
    r = Repository(database_url)
    r.ensure_tenant("clinic-a")
    r.ensure_tenant("clinic-b")
    yield r
    r.close()


def chat(repo: Repository, session_id: str, turns: list[tuple[str, str]]):
    return [repo.add_message(session_id, role, content, adapter_id="warm" if role == "assistant" else None,
                             scores={"safety": 4.0} if role == "assistant" else None,
                             gate="pass" if role == "assistant" else None) for role, content in turns]


def test_messages_are_committed_and_read_back_in_order(repo, database_url):
    s = repo.create_session("clinic-a", PREF, adapter_id="warm", locale="en-GB")
    turns = [("user", f"turn {i}") if i % 2 == 0 else ("assistant", f"reply {i}") for i in range(12)]
    chat(repo, s.id, turns)
    reopened = Repository(database_url)
    got = reopened.list_messages(s.id)
    assert [(m.role, m.content) for m in got] == turns
    assert got[1].scores == {"safety": 4.0} and got[1].gate == "pass" and got[0].adapter_id is None
    assert [m.content for m in reopened.list_messages(s.id, limit=3)] == ["reply 9", "turn 10", "reply 11"]
    if reopened.engine.dialect.name == "sqlite":
        with reopened.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert "turn 0" not in repr(got[0])
    reopened.close()


def test_a_session_starts_with_its_first_messages_whole_or_not_at_all(repo):
    first = [("user", "hello", None), ("assistant", "hi, I am listening", "client"), ("user", "work is too much", None)]
    s, stored = repo.start_session("clinic-a", PREF, "warm", "en-GB", first)
    assert (s.adapter_id, s.locale) == ("warm", "en-GB")
    assert [(m.role, m.content, m.gate) for m in stored] == first
    assert [(m.id, m.role, m.content, m.gate) for m in repo.list_messages(s.id)] == [
        (m.id, m.role, m.content, m.gate) for m in stored]
    with pytest.raises(RecordError, match="role 'robot'"):
        repo.start_session("clinic-b", PREF, None, "en", [("user", "kept?", None), ("robot", "no", None)])
    assert repo.count_sessions("clinic-b") == 0 and repo.count_sessions("clinic-a") == 1


def test_concurrent_writers_lose_nothing(repo):
    s = repo.create_session("clinic-a", PREF)

    def writer(w: int):
        for i in range(10):
            repo.add_message(s.id, "user", f"w{w}-{i}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [m.content for m in repo.list_messages(s.id)]
    assert len(got) == 40
    for w in range(4):
        assert [c for c in got if c.startswith(f"w{w}-")] == [f"w{w}-{i}" for i in range(10)]


def test_a_tenant_cannot_see_or_change_another_tenants_session(repo):
    s = repo.create_session("clinic-a", PREF, adapter_id="warm")
    chat(repo, s.id, [("user", "private")])
    assert repo.get_session("clinic-a", s.id).preference == PREF
    assert repo.get_session("clinic-b", s.id) is None
    assert repo.get_session("clinic-a", "no-such-id") is None
    assert repo.update_session("clinic-b", s.id, adapter_id="evil") is None
    assert repo.delete_session("clinic-b", s.id) is False
    assert repo.get_session("clinic-a", s.id).adapter_id == "warm"
    assert repo.count_messages(s.id) == 1
    assert repo.update_session("clinic-a", s.id, preference={"safety": 1.0}, adapter_id="safe").adapter_id == "safe"


def test_delete_erases_content_and_keeps_an_audit_event_without_text(repo, tmp_path):
    s = repo.create_session("clinic-a", PREF)
    keep = repo.create_session("clinic-a", PREF)
    secret = "I told nobody about the pills in the drawer"
    _, reply = chat(repo, s.id, [("user", secret), ("assistant", "Thank you for telling me.")])
    chat(repo, keep.id, [("user", "other session stays")])
    repo.add_feedback(s.id, message_id=reply.id, rating="up")
    repo.add_audit("crisis_protocol", tenant_id="clinic-a", session_id=s.id, detail={"rule": "means"})

    assert repo.delete_session("clinic-a", s.id) is True
    assert repo.get_session("clinic-a", s.id) is None
    assert repo.list_messages(s.id) == [] and repo.list_feedback(s.id) == []
    assert repo.count_messages() == 1 and repo.count_feedback() == 0
    with pytest.raises(RecordNotFound):
        repo.add_message(s.id, "user", "after deletion")
    events = repo.list_audit(session_id=s.id)
    assert [e.kind for e in events] == ["crisis_protocol", "session_deleted"]
    assert events[-1].detail == {"messages_erased": 2, "feedback_erased": 1}
    dumped = json.dumps([e.detail for e in events])
    assert "pills" not in dumped and "Thank you" not in dumped
    if repo.engine.dialect.name == "sqlite":
        on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("attune.db"))
        assert b"pills in the drawer" not in on_disk and b"other session stays" not in on_disk  # sealed, too
    assert [m.content for m in repo.list_messages(keep.id)] == ["other session stays"]


def test_audit_details_refuse_message_text(repo):
    with pytest.raises(RecordError, match="must not carry message text"):
        repo.add_audit("gate_fallback", detail={"scores": {"safety": 1.2}, "content": "the reply"})
    with pytest.raises(RecordError, match="capped at 200"):
        repo.add_audit("gate_fallback", detail={"reason": "x" * 201})
    assert repo.add_audit("gate_fallback", detail={"scores": {"safety": 1.2}}).kind == "gate_fallback"
    assert repo.count_audit("gate_fallback") == 1


def test_feedback_is_stored_as_alignment_pairs_and_checks_ownership(repo):
    s = repo.create_session("clinic-a", PREF)
    other = repo.create_session("clinic-a", PREF)
    user, first, _, second = chat(repo, s.id, [("user", "I feel stuck"), ("assistant", "Reply A"),
                                               ("user", "I feel stuck"), ("assistant", "Reply B")])
    _, foreign = chat(repo, other.id, [("user", "hi"), ("assistant", "other reply")])

    pair = repo.add_feedback(s.id, chosen_message_id=second.id, rejected_message_id=first.id)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.rating) == ("I feel stuck", "Reply B", "Reply A", None)
    thumb = repo.add_feedback(s.id, message_id=first.id, rating="down")
    assert (thumb.prompt, thumb.chosen, thumb.rejected, thumb.rating) == ("I feel stuck", None, "Reply A", "down")
    assert thumb.adapter_id == "warm" and thumb.to_pair("empathy") is None
    assert pair.to_pair("empathy").chosen == "Reply B" and pair.to_pair("empathy").source_id == f"feedback:{pair.id}"

    with pytest.raises(RecordNotFound, match="not in session"):
        repo.add_feedback(s.id, message_id=foreign.id, rating="up")
    with pytest.raises(RecordNotFound):
        repo.add_feedback(s.id, chosen_message_id=first.id, rejected_message_id=foreign.id)
    with pytest.raises(RecordError, match="feedback rates assistant replies"):
        repo.add_feedback(s.id, message_id=user.id, rating="up")
    assert repo.count_feedback(s.id) == 2 and repo.count_feedback(other.id) == 0


def test_flag_counts_and_ping(repo, tmp_path):
    s = repo.create_session("clinic-a", PREF)
    repo.create_session("clinic-b", PREF)
    repo.flag_session(s.id)
    assert repo.get_session("clinic-a", s.id).flagged is True
    assert repo.count_sessions() == 2 and repo.count_sessions("clinic-a", flagged=True) == 1
    assert repo.ping() is True
    gone = Repository(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")
    gone.engine.dispose()
    shutil.rmtree(tmp_path / "gone")
    assert gone.ping() is False


def test_a_flag_record_counts_turns_merges_detectors_and_reopens_after_acknowledgement(repo):
    s = repo.create_session("clinic-a", PREF)
    other = repo.create_session("clinic-b", PREF)
    first = repo.flag_session(s.id, detector="rules", categories=["kill_myself"])
    assert (first.session_id, first.tenant_id, first.flagged_turns, first.detector) == (s.id, "clinic-a", 1, "rules")
    assert first.first_flagged_at == first.last_flagged_at and first.acknowledged_at is None
    again = repo.flag_session(s.id, detector="model", categories=("means", "kill_myself"))
    assert (again.flagged_turns, again.detector, again.categories) == (2, "both", ["kill_myself", "means"])
    assert again.first_flagged_at == first.first_flagged_at < again.last_flagged_at
    repo.flag_session(other.id)  # the old signature: no detector, no categories
    assert (repo.get_flag(other.id).detector, repo.get_flag(other.id).categories) == ("unknown", [])
    assert repo.flag_session(other.id, detector="rules").detector == "rules"
    assert repo.get_session("clinic-a", s.id).flagged and repo.flag_session("no-such-session") is None

    assert [f.session_id for f in repo.list_flags()] == [other.id, s.id]
    assert [f.session_id for f in repo.list_flags("all", tenant_id="clinic-a")] == [s.id]
    acked = repo.acknowledge_flag(s.id, by=7)
    assert acked.acknowledged_by == 7 and acked.acknowledged_at is not None
    assert repo.acknowledge_flag(s.id, by=8).acknowledged_by == 7  # the first acknowledgement stands
    assert [f.session_id for f in repo.list_flags("open")] == [other.id]
    assert [f.session_id for f in repo.list_flags("acknowledged")] == [s.id]
    (event,) = repo.list_audit("flag_acknowledged")
    assert (event.session_id, event.detail) == (s.id, {"key_id": 7, "flagged_turns": 2})

    reopened = repo.flag_session(s.id, detector="rules")
    assert (reopened.flagged_turns, reopened.acknowledged_at, reopened.acknowledged_by) == (3, None, None)
    assert reopened.detector == "both" and {f.session_id for f in repo.list_flags("open")} == {s.id, other.id}
    assert repo.list_flags("acknowledged") == [] and repo.get_flag(repo.create_session("clinic-a", PREF).id) is None
    with pytest.raises(RecordNotFound, match="has no flag"):
        repo.acknowledge_flag("no-such-session", by=7)
    with pytest.raises(RecordError, match="use one of"):
        repo.list_flags("closed")


def test_flag_records_refuse_anything_but_names(repo):
    s = repo.create_session("clinic-a", PREF)
    for bad in ({"categories": ["I have the pills ready"]}, {"categories": [3]}, {"detector": "a reply text"},
                {"categories": ["x" * 65]}):
        with pytest.raises(RecordError, match="never holds message text"):
            repo.flag_session(s.id, **bad)
    assert repo.get_flag(s.id) is None and not repo.get_session("clinic-a", s.id).flagged
    assert repo.flag_session(s.id, detector="both", categories="self_harm:plan").categories == ["self_harm:plan"]


def test_erasure_keeps_the_flag_record_and_marks_it_erased(repo):
    s = repo.create_session("clinic-a", PREF)
    chat(repo, s.id, [("user", "I want to end it"), ("assistant", "I am here with you.")])
    repo.flag_session(s.id, detector="rules", categories=["end_it"])
    assert repo.message_counts([s.id, "never-used"]) == {s.id: 2, "never-used": 0}
    assert repo.delete_session("clinic-a", s.id)
    flag = repo.get_flag(s.id)
    assert flag.erased_at is not None and (flag.flagged_turns, flag.categories) == (1, ["end_it"])
    assert [f.session_id for f in repo.list_flags("open")] == [s.id] and repo.message_counts([s.id]) == {s.id: 0}
    assert repo.find_session(s.id).deleted and repo.find_session("no-such-session") is None
    assert repo.acknowledge_flag(s.id, by=1).erased_at == flag.erased_at


def test_concurrent_flags_of_one_session_make_one_record_and_lose_no_turn(repo):
    s = repo.create_session("clinic-a", PREF)
    errors = []

    def flagger(detector: str):
        try:
            for _ in range(5):
                repo.flag_session(s.id, detector=detector, categories=[detector])
        except Exception as e:  # collected: an exception in a thread would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=flagger, args=(d,)) for d in ("rules", "model", "rules", "model")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    (flag,) = repo.list_flags("all")
    assert (flag.flagged_turns, flag.detector, flag.categories) == (20, "both", ["model", "rules"])


def test_schema_compiles_for_postgresql():
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateTable

    ddl = "\n".join(str(CreateTable(t).compile(dialect=postgresql.dialect())) for t in Base.metadata.sorted_tables)
    for table in ("tenants", "api_keys", "sessions", "messages", "feedback", "audit_events", "session_flags"):
        assert f"CREATE TABLE {table}" in ddl
    assert "JSON" in ddl and "TIMESTAMP WITH TIME ZONE" in ddl


def test_rows_convert_to_api_shapes(repo):
    from serving.sessions_protocol import MessageOut, SessionOut

    s = repo.create_session("clinic-a", PREF, adapter_id="warm")
    _, reply = chat(repo, s.id, [("user", "hello"), ("assistant", "hi")])
    out = SessionOut.from_row(repo.get_session("clinic-a", s.id))
    assert (out.id, out.adapter, out.preference, out.flagged) == (s.id, "warm", PREF, False)
    assert abs(out.created - s.created.timestamp()) < 1 and s.created.tzinfo is not None
    msg = MessageOut.from_row(repo.list_messages(s.id)[-1]).model_dump()
    assert msg == {"id": reply.id, "role": "assistant", "content": "hi", "created": msg["created"],
                   "adapter": "warm", "scores": {"safety": 4.0}, "gate": "pass"}
