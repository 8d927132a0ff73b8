"""Tenants and privacy on the live service. A session belongs to its tenant: another tenant's key gets the same 404
as for an id that never existed, for every read, change, feedback, delete and chat, and the session is intact after.
A name, a phone number and an e-mail address told to the service (in chat, a crisis message, feedback and refused
requests) appear nowhere in the logs of the run (Ray's session folder, this process), in /metrics, nor in the files
of the database, which stores them sealed (serving/crypto.py) and still reads them back."""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.api import auth, new_key
from tests.integration.keys import KeyPool

SEEDED = {"name": "Zephyrine Quillfeather", "phone": "+44 7700 900461", "email": "zephyrine.q7@example.org"}
TOLD = (f"My name is {SEEDED['name']}; call me on {SEEDED['phone']} or write to {SEEDED['email']}. "
        "Work has been so hard lately.")


@pytest.mark.integration
def test_another_tenant_gets_404_for_everything_about_a_session_and_it_stays_intact(server):
    a = KeyPool(server, f"iso-a-{uuid.uuid4().hex[:6]}", size=4)
    b = auth(new_key(server, f"iso-b-{uuid.uuid4().hex[:6]}"))
    session = httpx.post(f"{server.v1}/sessions", json={"preference": "warm"}, headers=a.headers(), timeout=60).json()
    sid = session["id"]
    said = "I have not slept properly for a week and I feel on edge."
    r = httpx.post(f"{server.v1}/chat/completions", headers=a.headers(), timeout=180,
                   json={"messages": [{"role": "user", "content": said}], "session_id": sid, "max_tokens": 12})
    assert r.status_code == 200, r.text
    history = httpx.get(f"{server.v1}/sessions/{sid}/messages", headers=a.headers(), timeout=60).json()["data"]
    reply = history[-1]
    own = httpx.post(f"{server.v1}/sessions", json={}, headers=b, timeout=60).json()["id"]
    never = uuid.uuid4().hex

    attempts = {
        "read": lambda s: httpx.get(f"{server.v1}/sessions/{s}", headers=b, timeout=60),
        "messages": lambda s: httpx.get(f"{server.v1}/sessions/{s}/messages", headers=b, timeout=60),
        "preference": lambda s: httpx.patch(f"{server.v1}/sessions/{s}", json={"preference": "autonomy"},
                                            headers=b, timeout=60),
        "feedback": lambda s: httpx.post(f"{server.v1}/sessions/{s}/feedback", headers=b, timeout=60,
                                         json={"message_id": reply["id"], "rating": "down"}),
        "delete": lambda s: httpx.delete(f"{server.v1}/sessions/{s}", headers=b, timeout=60),
        "chat": lambda s: httpx.post(f"{server.v1}/chat/completions", headers=b, timeout=180, json={
            "messages": [{"role": "user", "content": "What did I say before?"}], "session_id": s, "max_tokens": 8}),
    }
    for what, attempt in attempts.items():
        theirs, absent = attempt(sid), attempt(never)
        print(f"\ntenant B {what} of A's session: {theirs.status_code} {theirs.text[:160]}")
        assert theirs.status_code == absent.status_code == 404, (what, theirs.text)
        assert theirs.text.replace(sid, "ID") == absent.text.replace(never, "ID"), "no hint that the session exists"
        assert said not in theirs.text and reply["content"] not in theirs.text
    lent = httpx.post(f"{server.v1}/sessions/{own}/feedback", json={"message_id": reply["id"], "rating": "up"},
                      headers=b, timeout=60)
    assert lent.status_code == 404 and reply["content"] not in lent.text, "A's reply id is not usable in B's session"
    listing = httpx.get(f"{server.v1}/sessions", headers=b, timeout=60)
    assert listing.status_code == 405 and sid not in listing.text, "there is no endpoint that lists sessions"

    kept = httpx.get(f"{server.v1}/sessions/{sid}", headers=a.headers(), timeout=60).json()
    assert {k: kept[k] for k in ("id", "preference", "adapter", "created")} == {
        k: session[k] for k in ("id", "preference", "adapter", "created")}
    assert httpx.get(f"{server.v1}/sessions/{sid}/messages", headers=a.headers(), timeout=60).json()["data"] == history
    assert httpx.post(f"{server.v1}/sessions/{sid}/feedback", json={"message_id": reply["id"], "rating": "up"},
                      headers=a.headers(), timeout=60).status_code == 201
    assert httpx.delete(f"{server.v1}/sessions/{sid}", headers=a.headers(), timeout=60).json()["deleted"] is True
    assert httpx.get(f"{server.v1}/sessions/{sid}", headers=a.headers(), timeout=60).status_code == 404


def ray_session_dir() -> Path:
    import ray

    return Path(ray._private.worker.global_worker.node.get_session_dir_path())


def files_holding(root: Path, needles: dict[str, bytes]) -> tuple[dict[str, list[str]], int]:
    """{needle name: [files that hold it]} over every regular file under `root`, and how many files were read."""
    found: dict[str, list[str]] = {k: [] for k in needles}
    read = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            read += 1
            for k, needle in needles.items():
                if needle in data:
                    found[k].append(str(path.relative_to(root)))
    return found, read


@pytest.mark.integration
def test_names_phones_and_emails_told_to_the_service_never_reach_logs_or_metrics(server, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    pool = KeyPool(server, f"privacy-{uuid.uuid4().hex[:6]}", size=6)

    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{server.v1}/chat/completions", json=body, headers=pool.headers(), timeout=180)

    first = post({"messages": [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
                               {"role": "user", "content": TOLD}], "max_tokens": 16})
    assert first.status_code == 200, first.text
    sid = first.json()["attune"]["session_id"]
    streamed = post({"messages": [{"role": "user", "content": f"Again, it's {SEEDED['name']} ({SEEDED['email']})."}],
                     "session_id": sid, "max_tokens": 16, "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    crisis = post({"messages": [{"role": "user", "content": f"{TOLD} I want to end my life tonight."}],
                   "max_tokens": 16})
    assert crisis.status_code == 200 and crisis.json()["attune"]["crisis"] is True, crisis.text
    history = httpx.get(f"{server.v1}/sessions/{sid}/messages", headers=pool.headers(), timeout=60).json()["data"]
    replies = [m["id"] for m in history if m["role"] == "assistant" and m["gate"] != "client"]  # "Hi." is client-written
    assert httpx.post(f"{server.v1}/sessions/{sid}/feedback", json={"message_id": replies[0], "rating": "up"},
                      headers=pool.headers(), timeout=60).status_code == 201
    assert httpx.post(f"{server.v1}/sessions/{sid}/feedback", headers=pool.headers(), timeout=60, json={
        "chosen_message_id": replies[-1], "rejected_message_id": SEEDED["email"]}).status_code == 422
    refused = [post({"messages": [{"role": "user", "content": TOLD}], "n": 2}),
               post({"messages": [{"role": "user", "content": TOLD}], "preference": "Quillfeather"}),
               post({"messages": [{"role": "user", "content": TOLD}], "session_id": "Zephyrine-Quillfeather"}),
               post({"messages": [{"role": "user", "content": TOLD}], "user": SEEDED["email"], "n": 1,
                     "stop": [SEEDED["phone"]], "max_tokens": 4})]
    assert [r.status_code for r in refused] == [422, 422, 404, 200]
    metrics = httpx.get(f"{server.url}/metrics", timeout=60).text

    needles = {k: v.encode() for k, v in SEEDED.items()}
    needles["surname"] = b"Quillfeather"
    in_ray, read = files_holding(ray_session_dir(), {**needles, "control": crisis.json()["id"].encode()})
    assert read > 0 and in_ray.pop("control"), "the crisis request's id (logged by design) must be found: " \
                                               "the scan reads the files the service logs to"
    assert in_ray == {k: [] for k in needles}, in_ray
    in_db, db_files = files_holding(server.data_dir, needles)
    assert db_files > 0 and in_db == {k: [] for k in needles}, in_db
    assert TOLD in [m["content"] for m in history], "the service reads its sealed messages back"
    here = capfd.readouterr()
    process_text = caplog.text + here.out + here.err
    print(f"\nscanned {read} files under {ray_session_dir()}, {len(process_text)} characters of this process's "
          f"output and logs, {len(metrics)} of /metrics")
    for k, v in SEEDED.items():
        assert v not in process_text, f"{k} in this process's logs"
        assert v not in metrics and "Quillfeather" not in metrics, f"{k} in /metrics"
