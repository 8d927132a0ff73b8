"""The patient app in a real headless Chromium (Debian's, driven by Playwright) in front of the real API: `attune
ui` runs as its own process; the patient answers the questionnaire by keyboard, sends a message and sees the
streamed reply, gives it a thumb, sets off the crisis protocol and sees the banner, changes the style mid-session,
reads it all at phone width without sideways scrolling, and deletes the conversation. Each step is checked
through the API (and the feedback row in the service's database, which no route exposes) and saved as a
screenshot under test-artifacts/ui/. The page must not reach any host but the UI's own."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from alignment.objectives import DEFAULT_SAFETY_FLOOR, OBJECTIVES
from ui.wording import CRISIS_HEADING

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PHONE = {"width": 375, "height": 812}
WAIT_MS = 600_000
"""Upper bound for a reply on a busy 2-core machine; never a measured time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def patient(server):
    """(key, tenant): a fresh patient-app key, so that no other test's requests count against its rate limit."""
    tenant = f"ui-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{server.v1}/admin/keys", json={"tenant": tenant},
                   headers={"Authorization": f"Bearer {server.operator_key}"})
    assert r.status_code == 201, r.text
    return r.json()["key"], tenant


@pytest.fixture
def ui_url(server, patient, tmp_path):
    """`attune ui` on a free port, pointed at the real API; stopped (and its log shown on failure) afterwards."""
    port = _free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "ATTUNE_API_KEY": patient[0], "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("attune")), "ui", "--api-url", server.url,
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            assert proc.poll() is None, f"attune ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"\nattune ui log (tail):\n{log.read_text()[-1500:]}")


def _session_id(server, tenant: str) -> str:
    """The UI's session: the only one of the fresh tenant (the UI never shows ids to the patient)."""
    from sqlalchemy import select

    from serving.db import ChatSession, Repository

    repo = Repository(f"sqlite:///{server.data_dir / 'attune.db'}", create_tables=False)
    try:
        with repo._tx.begin() as s:
            ids = s.scalars(select(ChatSession.id).where(ChatSession.tenant_id == tenant)).all()
    finally:
        repo.close()
    assert len(ids) == 1, ids
    return ids[0]


def _feedback(server, session_id: str) -> list:
    from serving.db import Repository

    repo = Repository(f"sqlite:///{server.data_dir / 'attune.db'}", create_tables=False)
    try:
        return repo.list_feedback(session_id)
    finally:
        repo.close()


def _letters(text: str) -> str:
    """Letters and digits only: rendered Markdown and the stored text compare equal."""
    return "".join(ch for ch in text if ch.isalnum())


def _no_sideways_scroll(page) -> list[str]:
    """Elements that stick out past the right edge of the window (empty when nothing overflows)."""
    return page.evaluate("""() => {
        const width = document.documentElement.clientWidth;
        const wide = document.documentElement.scrollWidth > width ? ['document'] : [];
        for (const e of document.querySelectorAll('body *')) {
            const r = e.getBoundingClientRect();
            if (r.width > 0 && r.height > 0 && r.right > width + 1 && getComputedStyle(e).visibility !== 'hidden')
                wide.push(e.tagName + (e.id ? '#' + e.id : ''));
        }
        return wide.slice(0, 10);
    }""")


@pytest.mark.integration
def test_patient_journey_in_a_real_browser(server, patient, ui_url):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/bootstrap.sh (apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    key, tenant = patient
    auth = {"Authorization": f"Bearer {key}"}
    elsewhere: list[str] = []
    expect.set_options(timeout=WAIT_MS)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 900})
            page.set_default_timeout(WAIT_MS)
            page.on("request", lambda r: elsewhere.append(r.url)
                    if urlparse(r.url).hostname not in (None, "127.0.0.1", "localhost") else None)
            page.goto(ui_url)

            # 1. Onboarding by keyboard: the questions are named groups of radios; arrows move the choice.
            heard = page.get_by_role("group", name="Feeling heard and understood")
            heard.get_by_role("radio", name="Somewhat").focus()
            page.keyboard.press("ArrowRight")
            expect(heard.get_by_role("radio", name="A lot")).to_be_checked()
            status = page.locator("#status")
            expect(status).to_have_attribute("aria-live", "polite")
            page.screenshot(path=ARTIFACTS / "1-onboarding.png", full_page=True)
            page.get_by_role("button", name="Save and start talking").focus()
            page.keyboard.press("Enter")
            box = page.get_by_role("textbox", name="Your message")
            expect(box).to_be_focused()
            style = page.locator("#style")
            expect(style).to_contain_text("feel heard and understood")
            assert not any(o in style.inner_text().lower() for o in OBJECTIVES if o != "safety")
            sid = _session_id(server, tenant)
            pref = httpx.get(f"{server.v1}/sessions/{sid}", headers=auth).json()["preference"]
            assert max((o for o in pref if o != "safety"), key=pref.get) == "empathy"
            assert pref["safety"] >= DEFAULT_SAFETY_FLOOR

            # 2. A message; the reply streams into the conversation log and is the one the service stored.
            box.fill("I had a rough week at work and I feel completely drained.")
            box.press("Enter")
            log = page.get_by_role("log")
            replies = log.locator('[data-testid="bot"]')
            expect(replies).to_have_count(1)
            expect(status).not_to_contain_text("Replying")
            messages = httpx.get(f"{server.v1}/sessions/{sid}/messages", headers=auth).json()["data"]
            assert [m["role"] for m in messages] == ["user", "assistant"]
            assert _letters(replies.last.inner_text()) == _letters(messages[1]["content"]) != ""
            page.screenshot(path=ARTIFACTS / "2-reply.png", full_page=True)

            # 3. A thumb on the reply, stored against that message.
            log.get_by_role("button", name="Like", exact=True).click()
            expect(status).to_contain_text("feedback on that reply was saved")
            (row,) = _feedback(server, sid)
            assert (row.rating, row.message_id) == ("up", messages[1]["id"])
            page.screenshot(path=ARTIFACTS / "3-feedback.png", full_page=True)

            # 4. A crisis message: the banner (an alert) lists the service's crisis resources.
            box.fill("I can't do this anymore. I want to kill myself tonight.")
            page.get_by_role("button", name="Send").click()
            banner = page.get_by_role("alert").filter(has_text=CRISIS_HEADING)
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("your local emergency number")
            expect(banner.get_by_role("link", name="https://findahelpline.com")).to_be_visible()
            session = httpx.get(f"{server.v1}/sessions/{sid}", headers=auth).json()
            assert session["flagged"] is True
            page.screenshot(path=ARTIFACTS / "4-crisis.png", full_page=True)

            # 5. The style changes mid-session, through the API, in plain words on the page.
            page.get_by_role("button", name="Change how I respond").click()
            expect(heard.get_by_role("radio", name="A lot")).to_be_focused()
            heard.get_by_role("radio", name="Not so much").check()
            page.get_by_role("group", name="Keeping decisions my own").get_by_role("radio", name="A lot").check()
            page.get_by_role("button", name="Save my choices").click()
            expect(style).to_contain_text("decisions with you")
            pref = httpx.get(f"{server.v1}/sessions/{sid}", headers=auth).json()["preference"]
            assert max((o for o in pref if o != "safety"), key=pref.get) == "patient_autonomy"
            assert pref["safety"] >= DEFAULT_SAFETY_FLOOR
            expect(replies).to_have_count(2)
            page.screenshot(path=ARTIFACTS / "5-style-changed.png", full_page=True)

            # 6. Phone width: everything fits, nothing scrolls sideways.
            page.set_viewport_size(PHONE)
            expect(box).to_be_visible()
            assert _no_sideways_scroll(page) == []
            page.screenshot(path=ARTIFACTS / "6-phone.png", full_page=True)

            # 7. Delete: confirmed, erased on the service (404, no feedback left), back to the questionnaire.
            page.get_by_role("button", name="Delete my conversation").click()
            expect(page.get_by_role("button", name="No, keep it")).to_be_focused()
            page.get_by_role("button", name="Yes, delete it").click()
            expect(status).to_contain_text("Your conversation was deleted")
            expect(page.get_by_role("button", name="Save and start talking")).to_be_visible()
            assert httpx.get(f"{server.v1}/sessions/{sid}", headers=auth).status_code == 404
            assert httpx.get(f"{server.v1}/sessions/{sid}/messages", headers=auth).status_code == 404
            assert _feedback(server, sid) == []
            assert _no_sideways_scroll(page) == []
            page.screenshot(path=ARTIFACTS / "7-deleted.png", full_page=True)
        finally:
            browser.close()
    assert elsewhere == [], f"the page reached other hosts: {elsewhere[:5]}"
