"""What the patient reads besides the conversation: the introduction, the privacy notice, the crisis banner and
plain-words explanations of failures. Kept apart from the layout so that the words can be reviewed (and tested)
on their own."""
from __future__ import annotations

import html
import re

from ui.client import ApiProblem

TITLE = "Attune"
INTRO = ("A private space to talk things through. Attune is a supportive chat program, not a therapist, "
         "and it is not an emergency service.")
ONBOARDING = ("**Before we start:** everyone finds different things helpful when they talk about hard things. "
              "How much does each of these help you? You can change your answers at any time.")

PRIVACY_SUMMARY = ("**Privacy:** your messages and any feedback you give are stored on the Attune service so the "
                   "conversation can continue. You can delete them at any time with *Delete my conversation*.")
PRIVACY_DETAILS = """\
- **What is kept:** your messages, the replies, your feedback on replies and the style you chose. Your name is
  not asked for; don't include details that identify you unless you want to.
- **Who can see it:** the people who run this service, to keep it safe and working. If a message suggests you
  may be at risk, the conversation is marked so that it can be reviewed.
- **Deleting:** *Delete my conversation* erases your messages and feedback from the service straight away.
  Only a note that a conversation existed, with none of its content, is kept. This page forgets the
  conversation when you reload or close it, and then can no longer delete it: delete it before you leave.
- **In an emergency:** call your local emergency number. Attune cannot send help.
"""

CRISIS_HEADING = "Help is available right now"
CRISIS_FALLBACK = "If you are in danger right now, call your local emergency number."


def crisis_banner(resources: str) -> str:
    """The banner (HTML, announced by screen readers) with the crisis resources that the service sent: a crisis
    reply opens with them, a lead line then one "- name: contact" line each (also sent on their own with the
    reply's first chunk), so the operator's resources for the session's locale are what shows. `resources` may be
    that block or the whole reply: the first paragraph with "- " lines is used."""
    blocks = [b.strip().splitlines() for b in resources.strip().split("\n\n")]
    block = next((b for b in blocks if any(line.startswith("- ") for line in b)), [])
    items = [line[2:].strip() for line in block if line.startswith("- ")]
    lead = next((line for line in block if not line.startswith("- ")), "") if items else CRISIS_FALLBACK
    body = "".join(f"<li>{_linked(i)}</li>" for i in items)
    return (f'<div class="crisis-banner" role="alert"><h2>{html.escape(CRISIS_HEADING)}</h2>'
            f"<p>{html.escape(lead)}</p>{f'<ul>{body}</ul>' if body else ''}</div>")


def _linked(text: str) -> str:
    """Escaped text whose https:// addresses are links."""
    parts = re.split(r"(https://[^\s)]+)", text)
    return "".join(f'<a href="{html.escape(p)}" target="_blank" rel="noopener">{html.escape(p)}</a>'
                   if p.startswith("https://") else html.escape(p) for p in parts)


def problem_text(problem: ApiProblem, doing: str) -> str:
    """A failure in plain words: what happened while `doing` (e.g. "sending your message") and what to do."""
    if problem.unreachable:
        return f"Sorry, the Attune service can't be reached right now, so {doing} didn't work. Please try again in a minute."
    if problem.status == 429:
        wait = f"about {max(1, round(problem.retry_after))} seconds" if problem.retry_after else "a moment"
        return f"That was a lot in a short time. Please wait {wait}, then try {doing} again."
    if problem.status == 503 or problem.code == "engine_unavailable":
        return f"Sorry, I couldn't reply just now. Please try {doing} again in a few seconds."
    if problem.status == 404:
        return "This conversation no longer exists on the service. Reload the page to start a new one."
    if problem.status == 401:
        return "The Attune service did not accept this app's key. Please tell whoever runs this service."
    if problem.status is not None and 400 <= problem.status < 500:
        return f"That didn't work: {problem.message}"
    return f"Sorry, something went wrong while {doing}. Please try again."
