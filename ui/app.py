"""The patient's page (Gradio Blocks): questionnaire, streamed chat with a thumb on each reply, the current style
in plain words, a crisis banner, the privacy notice and erasure. Every action is one call of `AttuneClient`;
the page keeps only the session id and which server message each shown reply is."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing leaves the host

import gradio as gr  # noqa: E402

from ui import wording  # noqa: E402
from ui.client import ApiProblem, AttuneClient  # noqa: E402
from ui.questionnaire import ANSWERS, DEFAULT_ANSWER, QUESTIONS, describe, preference_from_answers  # noqa: E402

log = logging.getLogger("attune.ui")

CSS = """
.gradio-container { max-width: 760px !important; margin: 0 auto; }
.crisis-banner { border: 3px solid #b42318; background: #fef3f2; color: #3d0d09; border-radius: 8px;
                 padding: 0.75rem 1rem; }
.crisis-banner h2 { margin: 0 0 0.25rem; font-size: 1.2rem; font-weight: 700; }
.crisis-banner a { color: #0b4a8b; text-decoration: underline; }
.crisis-banner ul { margin: 0.25rem 0 0; padding-left: 1.25rem; }
#chat button[aria-label="Clear"] { display: none !important; }  /* would clear the screen only, not the service */
"""
SAVE_FIRST, SAVE_CHANGES = "Save and start talking", "Save my choices"
FIRST_ANSWER = f"#q-{QUESTIONS[0].objective} input:checked"


def focus(selector: str) -> str:
    """JS that moves the keyboard focus to `selector` once Gradio has shown it."""
    return f"() => setTimeout(() => document.querySelector({selector!r})?.focus(), 0)"


ACCESSIBILITY = """() => {
  // Gradio's radio groups are unnamed fieldsets whose inputs have different names (arrow keys do nothing);
  // the status line is not announced. Patched on load and whenever Gradio re-renders a part of the page.
  const patch = () => {
    const status = document.getElementById('status');
    if (status && !status.hasAttribute('aria-live')) {
      status.setAttribute('role', 'status');
      status.setAttribute('aria-live', 'polite');
    }
    document.querySelectorAll('fieldset[id^="q-"]').forEach((set) => {
      const label = set.querySelector('[data-testid="block-info"]');
      const info = set.querySelector('.info-text');
      if (label && !label.id) { label.id = set.id + '-label'; set.setAttribute('aria-labelledby', label.id); }
      if (info && !info.id) { info.id = set.id + '-info'; set.setAttribute('aria-describedby', info.id); }
      set.querySelectorAll('input[type=radio]').forEach((input) => { if (input.name !== set.id) input.name = set.id; });
    });
  };
  patch();
  new MutationObserver(patch).observe(document.body, {childList: true, subtree: true});
}"""


@dataclass
class Conversation:
    """One browser tab's state."""

    session_id: str | None = None
    reply_ids: dict[int, str] = field(default_factory=dict)
    """Index in the chat history -> the server's message id of that reply (what a thumb rates)."""


def _show(visible: bool):
    return gr.update(visible=visible)


class PatientApp:
    """The handlers (plain methods, testable without a browser) and the page that wires them up."""

    def __init__(self, client: AttuneClient):
        self.client = client

    # ------------------------------------------------------------ handlers
    def save_style(self, conv: Conversation, *answers: str):
        """Start the session with the questionnaire's answers, or change its style. Returns (conversation,
        questionnaire visible, chat visible, style text, status)."""
        pref = preference_from_answers({q.objective: a for q, a in zip(QUESTIONS, answers)})
        try:
            if conv.session_id is None:
                conv.session_id = self.client.create_session(pref)
                status = "You can start whenever you are ready."
            else:
                self.client.set_preference(conv.session_id, pref)
                status = "Your choices were saved. The next reply will follow them."
        except ApiProblem as p:
            log.warning("saving the style failed: HTTP %s %s", p.status, p.code)
            return conv, _show(True), _show(False), gr.update(), wording.problem_text(p, "saving your choices")
        return conv, _show(False), _show(True), f"**How I'll respond:** {describe(pref)}", status

    def send(self, conv: Conversation, message: str, history: list[dict]) -> Iterator[tuple]:
        """Stream the reply to `message`. Yields (conversation, history, message box, banner, status). The crisis
        banner shows as soon as the service sends crisis resources (before the rest of the reply), and stays when
        the stream then fails."""
        text = (message or "").strip()
        if not text or conv.session_id is None:
            yield conv, history, message, gr.update(), "Write a message first." if not text else ""
            return
        history = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield conv, history, "", gr.update(), "Replying…"
        reply, shown = "", False

        def banner(resources: str | None) -> dict:
            nonlocal shown
            if shown or not resources:
                return gr.update()
            shown = True
            return gr.update(value=wording.crisis_banner(resources), visible=True)

        try:
            for update in self.client.stream_reply(conv.session_id, text):
                reply = update.text
                history = [*history[:-1], {"role": "assistant", "content": reply}]
                resources = update.resources or (reply if update.crisis else None)
                if update.done:
                    conv.reply_ids[len(history) - 1] = self.client.last_reply_id(conv.session_id)
                    yield conv, history, "", banner(resources), ""
                    return
                yield conv, history, "", banner(update.resources), "Replying…"
        except ApiProblem as p:
            log.warning("a reply failed: HTTP %s %s", p.status, p.code)
            status = wording.problem_text(p, "sending your message")
            if reply:
                yield conv, history, "", banner(p.crisis_resources), status
            else:
                yield conv, history[:-2], text, banner(p.crisis_resources), status

    def rate(self, conv: Conversation, like: gr.LikeData) -> str:
        """Store a thumb on the reply at `like.index`; the status line."""
        message_id = conv.reply_ids.get(like.index)
        if like.liked not in (True, False):
            return "Your feedback on that reply stays as you gave it."
        if message_id is None or conv.session_id is None:
            return "That reply can't be rated, sorry: it did not finish."
        try:
            self.client.feedback(conv.session_id, message_id, like.liked)
        except ApiProblem as p:
            log.warning("feedback failed: HTTP %s %s", p.status, p.code)
            return wording.problem_text(p, "saving your feedback")
        return "Thank you: your feedback on that reply was saved."

    def delete(self, conv: Conversation):
        """Erase the conversation on the service and start over. Returns (conversation, history, questionnaire
        visible, chat visible, confirmation visible, banner, status)."""
        if conv.session_id is not None:
            try:
                self.client.delete_session(conv.session_id)
            except ApiProblem as p:
                if p.status != 404:  # already gone is what was asked for
                    log.warning("deleting failed: HTTP %s %s", p.status, p.code)
                    return (conv, gr.update(), gr.update(), gr.update(), _show(False), gr.update(),
                            wording.problem_text(p, "deleting your conversation"))
        return (Conversation(), [], _show(True), _show(False), _show(False), gr.update(value="", visible=False),
                "Your conversation was deleted from the service. You can start a new one below.")

    # ------------------------------------------------------------ page
    def build(self) -> gr.Blocks:
        with gr.Blocks(title=wording.TITLE, analytics_enabled=False) as page:
            conv = gr.State(Conversation())
            gr.Markdown(f"# {wording.TITLE}\n\n{wording.INTRO}")
            gr.Markdown(wording.PRIVACY_SUMMARY)
            with gr.Accordion("More about your privacy", open=False):
                gr.Markdown(wording.PRIVACY_DETAILS)
            status = gr.Markdown("", elem_id="status")

            with gr.Column(elem_id="onboarding") as onboarding:
                gr.Markdown(wording.ONBOARDING)
                answers = [gr.Radio(list(ANSWERS), value=DEFAULT_ANSWER, label=q.label, info=q.info,
                                    elem_id=f"q-{q.objective}") for q in QUESTIONS]
                save = gr.Button(SAVE_FIRST, variant="primary")

            with gr.Column(visible=False, elem_id="conversation") as chat:
                with gr.Row(equal_height=True):
                    style = gr.Markdown("", elem_id="style")
                    change = gr.Button("Change how I respond", size="sm", scale=0, min_width=120)
                chatbot = gr.Chatbot([], label="Conversation", elem_id="chat", height=420,
                                     placeholder="Share whatever is on your mind.", buttons=["copy"])
                banner = gr.HTML("", visible=False, js_on_load=None, apply_default_css=False)
                message = gr.Textbox(label="Your message", placeholder="Type here, then press Enter or Send",
                                     lines=1, max_lines=6, elem_id="message")
                send = gr.Button("Send", variant="primary")
                forget = gr.Button("Delete my conversation", variant="stop")
                with gr.Column(visible=False) as confirm:
                    gr.Markdown("Delete this conversation from the service? This cannot be undone.")
                    with gr.Row():
                        yes = gr.Button("Yes, delete it", variant="stop")
                        no = gr.Button("No, keep it", elem_id="confirm-no")

            save.click(self.save_style, [conv, *answers], [conv, onboarding, chat, style, status]).then(
                None, js=focus("#message textarea"))
            change.click(lambda: (_show(True), _show(False), "", gr.update(value=SAVE_CHANGES)), None,
                         [onboarding, chat, status, save]).then(None, js=focus(FIRST_ANSWER))
            for trigger in (send.click, message.submit):
                trigger(self.send, [conv, message, chatbot], [conv, chatbot, message, banner, status])
            chatbot.like(self.rate, [conv], [status])
            forget.click(lambda: _show(True), None, [confirm]).then(None, js=focus("#confirm-no"))
            no.click(lambda: _show(False), None, [confirm])
            yes.click(self.delete, [conv], [conv, chatbot, onboarding, chat, confirm, banner, status]).then(
                lambda: gr.update(value=SAVE_FIRST), None, [save]).then(None, js=focus(FIRST_ANSWER))
            page.load(None, js=ACCESSIBILITY)
        return page


def serve(api_url: str, api_key: str, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the page until interrupted (no share link, no API page, no run history: nothing leaves the host)."""
    client = AttuneClient(api_url, api_key)
    try:
        PatientApp(client).build().queue(default_concurrency_limit=8).launch(
            server_name=host, server_port=port, share=False, footer_links=[], run_history=False, ssr_mode=False,
            css=CSS)
    finally:
        client.close()
