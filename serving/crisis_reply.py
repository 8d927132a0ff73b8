"""The crisis reply: the one table of crisis resources per locale and the vetted reply templates that put them
first. Written after safe-messaging guidance (988 Lifeline / SAMHSA, the Action Alliance, JED): resources, then
validation, then a direct and caring question about safety; no method or means, suicide never framed as a solution.

When the crisis protocol fires, the reply is the template alone: nothing is generated. A model's text after a
direct question about safety could only dilute it, and a fixed, reviewed text needs no gate and cannot fail to arrive.
Nor is it scored: the safety classifier, trained on model replies, rates a reply that names suicide as unsafe
(1.1-1.2 on the 1-5 scale for these templates with reward model v2), which would only mislead the record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

CRISIS_REPLY_ID = "crisis-template"
"""What `attune.adapter` and the stored message name as the source of a crisis reply (no model wrote it)."""

_DANGER = "if you are in immediate danger"
DEFAULT_CRISIS_RESOURCES: dict[str, list[dict[str, str]]] = {
    "en-US": [{"name": "988 Suicide & Crisis Lifeline", "contact": "call or text 988",
               "description": "free, confidential, 24/7"},
              {"name": "Crisis Text Line", "contact": "text HOME to 741741", "description": "free, 24/7"},
              {"name": "Emergency services", "contact": "call 911", "description": _DANGER}],
    "en-GB": [{"name": "Samaritans", "contact": "call 116 123", "description": "free, 24/7"},
              {"name": "Shout", "contact": "text SHOUT to 85258", "description": "free, 24/7"},
              {"name": "Emergency services", "contact": "call 999", "description": _DANGER}],
    "en-IE": [{"name": "Samaritans", "contact": "call 116 123", "description": "free, 24/7"},
              {"name": "Emergency services", "contact": "call 112 or 999", "description": _DANGER}],
    "en-CA": [{"name": "9-8-8 Suicide Crisis Helpline", "contact": "call or text 9-8-8", "description": "free, 24/7"},
              {"name": "Emergency services", "contact": "call 911", "description": _DANGER}],
    "en-AU": [{"name": "Lifeline", "contact": "call 13 11 14", "description": "24/7"},
              {"name": "Emergency services", "contact": "call 000", "description": _DANGER}],
    "en-NZ": [{"name": "1737 helpline", "contact": "call or text 1737", "description": "free, 24/7"},
              {"name": "Lifeline Aotearoa", "contact": "call 0800 543 354", "description": "free, 24/7"},
              {"name": "Emergency services", "contact": "call 111", "description": _DANGER}],
    "en": [{"name": "Find A Helpline", "contact": "https://findahelpline.com",
            "description": "free, confidential helplines in your country"},
           {"name": "Emergency services", "contact": "call your local emergency number", "description": _DANGER}],
}
"""Locale -> resources, shipped as ServeConfig.crisis_resources' default; 'en' is the international default."""


def normalise_locale(locale: str | None) -> str:
    """'en_gb' / 'EN-gb' -> 'en-GB'; a bare language stays lowercase."""
    if not locale:
        return ""
    parts = locale.replace("_", "-").split("-")
    return "-".join([parts[0].lower(), *(p.upper() if len(p) == 2 else p for p in parts[1:])])


def locale_chain(locale: str | None) -> list[str]:
    """Where to look for a locale's table entry, most specific first: 'en_gb' -> ['en-GB', 'en']."""
    loc = normalise_locale(locale)
    return [k for k in dict.fromkeys((loc, loc.split("-")[0])) if k]


def lookup(table: Mapping[str, object], locale: str | None, default_locale: str) -> str:
    """The key of `table` for `locale`: the locale, its language, else `default_locale`."""
    return next((k for k in locale_chain(locale) if k in table), default_locale)


@dataclass(frozen=True)
class CrisisTemplate:
    """One wording: `lead` heads the resource lines, then `validation`, then `question` (the reply's last words)."""

    lead: str
    validation: str
    question: str


TEMPLATES: dict[str, tuple[CrisisTemplate, ...]] = {"en": (
    CrisisTemplate(
        "You can talk to someone right now, any time of day or night:",
        "Thank you for telling me. What you are feeling matters, and you don't have to face it alone.",
        "I want to ask you directly, because I care about your safety: are you thinking about suicide? "
        "Are you safe right now?"),
    CrisisTemplate(
        "Support is there for you right now, and reaching out is a strong step:",
        "I'm really glad you told me. It sounds like you are in a lot of pain, and you deserve care and support.",
        "Can I ask you something directly? Are you having thoughts of ending your life, and are you somewhere "
        "safe right now?"),
    CrisisTemplate(
        "Before anything else, here is where you can reach a person right now:",
        "What you're going through sounds incredibly hard, and I'm glad you said it out loud. Feelings this "
        "intense can ease, and support can help you through this moment.",
        "Are you thinking about suicide? Please tell me: are you safe right now?"),
)}
"""Language or locale -> wordings, found like resources ('en-GB' -> 'en'); a locale with none gets 'en''s."""


@dataclass(frozen=True)
class CrisisText:
    text: str
    """The whole reply: the resources block, validation, question."""
    resources: str
    """The resources block alone (the lead line, then one '- name: contact (description)' line each)."""


def resource_line(resource: Mapping[str, str]) -> str:
    desc = f" ({resource['description']})" if resource.get("description") else ""
    return f"- {resource['name']}: {resource['contact']}{desc}"


class CrisisReply:
    """The crisis reply for a locale, from the configured resources and the vetted templates."""

    def __init__(self, resources: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
                 default_locale: str = "en", templates: Mapping[str, Sequence[CrisisTemplate]] = TEMPLATES):
        resources = DEFAULT_CRISIS_RESOURCES if resources is None else resources
        self.resources = {normalise_locale(k): [dict(r) for r in v] for k, v in resources.items()}
        self.default_locale = normalise_locale(default_locale)
        if self.default_locale not in self.resources:
            raise ValueError(f"default locale {default_locale!r} has no crisis resources; "
                             f"configure it or pick one of {sorted(self.resources)}")
        for loc, items in self.resources.items():
            if not items:
                raise ValueError(f"locale {loc!r} has no crisis resources; list at least one or remove it")
            for r in items:
                missing = [k for k in ("name", "contact") if not r.get(k)]
                if missing:
                    raise ValueError(f"crisis resource {r} for locale {loc!r} lacks {missing}")
        self.templates = {normalise_locale(k): tuple(v) for k, v in templates.items()}
        if "en" not in self.templates or not all(self.templates.values()):
            raise ValueError("templates need at least one wording per language, and one for 'en'")

    def locale_for(self, locale: str | None) -> str:
        return lookup(self.resources, locale, self.default_locale)

    def wordings(self, locale: str | None) -> tuple[CrisisTemplate, ...]:
        return self.templates[lookup(self.templates, locale, "en")]

    def reply(self, locale: str | None, previous: Sequence[str] = ()) -> CrisisText:
        """The reply for `locale`. `previous` are the session's earlier replies, oldest first: the wording after
        the one the latest crisis reply used is chosen, so that a repeated crisis turn never reads the same."""
        wordings = self.wordings(locale)
        used = next((i for text in reversed(previous) for i, t in enumerate(wordings) if text.startswith(t.lead)),
                    None)
        t = wordings[0 if used is None else (used + 1) % len(wordings)]
        block = "\n".join([t.lead, *(resource_line(r) for r in self.resources[self.locale_for(locale)])])
        return CrisisText(f"{block}\n\n{t.validation}\n\n{t.question}", block)


def resources_block(text: str, templates: Mapping[str, Sequence[CrisisTemplate]] = TEMPLATES) -> str | None:
    """The resources block that opens `text` if it is a crisis reply (a template's lead, then at least one
    resource line), else None."""
    head = text.lstrip().split("\n\n", 1)[0]
    leads = {t.lead for wordings in templates.values() for t in wordings}
    lines = head.splitlines()
    if len(lines) > 1 and lines[0] in leads and all(line.startswith("- ") and ": " in line for line in lines[1:]):
        return head
    return None
