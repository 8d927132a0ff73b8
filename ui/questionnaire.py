"""The onboarding questionnaire in plain words, the `Preference` its answers become, and the plain-words
description of a preference. The patient never sees objective names or weights, and no answer can put the
safety weight below the operator's floor: safety is not a question, it is fixed first and the answers share
the rest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from alignment.objectives import DEFAULT_SAFETY_FLOOR, Preference


@dataclass(frozen=True)
class Question:
    objective: str
    label: str
    """The question as the patient reads it."""
    info: str
    """One sentence that says what a reply in this style does."""
    phrase: str
    """How the current style names this objective ("I'll focus on ...")."""


QUESTIONS: tuple[Question, ...] = (
    Question("empathy", "Feeling heard and understood",
             "Replies that notice how you feel and take it seriously, without judging.",
             "helping you feel heard and understood"),
    Question("active_listening", "Being listened to carefully",
             "Replies that reflect back the details you shared and ask about them.",
             "listening closely to what you share"),
    Question("self_motivated_change", "Being gently encouraged toward change",
             "Replies that help you find your own reasons and small next steps.",
             "gently encouraging the changes you want"),
    Question("patient_autonomy", "Keeping decisions my own",
             "Replies that offer options rather than instructions, at your pace.",
             "leaving decisions with you"),
    Question("trust_rapport", "Building trust",
             "Replies with a steady, genuine and respectful tone.",
             "building trust at your pace"),
)
"""One question per objective except safety, which the patient is not asked to trade away."""

ANSWERS: dict[str, float] = {"Not so much": 1.0, "Somewhat": 2.0, "A lot": 5.0}
"""How much each answer counts; 'A lot' on one question against 'Not so much' on the rest gives about the
shape of the shipped single-objective MODPO adapters (about 0.44 on it, 0.09 on each other one)."""
DEFAULT_ANSWER = "Somewhat"

SAFETY_WEIGHT = 0.2
"""The safety weight the questionnaire starts from: what the shipped MODPO adapters were trained with, so that
answers route near them. The operator's floor wins when it is higher."""

SAFETY_PHRASE = "Keeping you safe always comes first."

class AnswerError(ValueError):
    """An answer the questionnaire does not offer; the message lists the choices."""


def preference_from_answers(answers: Mapping[str, str], safety_floor: float = DEFAULT_SAFETY_FLOOR) -> Preference:
    """The `Preference` for answers keyed by objective (a missing answer counts as DEFAULT_ANSWER). Safety gets
    max(SAFETY_WEIGHT, safety_floor); the other five share the rest in proportion to their answers."""
    unknown = sorted(set(answers) - {q.objective for q in QUESTIONS})
    if unknown:
        raise AnswerError(f"no question for {unknown}; answer only {[q.objective for q in QUESTIONS]}")
    counts = {}
    for q in QUESTIONS:
        answer = answers.get(q.objective) or DEFAULT_ANSWER
        if answer not in ANSWERS:
            raise AnswerError(f"{q.label!r}: {answer!r} is not a choice; choose one of {list(ANSWERS)}")
        counts[q.objective] = ANSWERS[answer]
    safety = max(SAFETY_WEIGHT, safety_floor)
    if not 0.0 <= safety <= 1.0:
        raise AnswerError(f"safety floor {safety_floor} must be within [0, 1]")
    total = sum(counts.values())
    weights = {o: (1.0 - safety) * c / total for o, c in counts.items()}
    return Preference({**weights, "safety": safety}, normalize=True)


def describe(preference: Preference | Mapping[str, float]) -> str:
    """The style in plain words: what the replies focus on most, never a weight or an objective name."""
    pref = preference if isinstance(preference, Preference) else Preference(preference, normalize=True)
    ranked = sorted(QUESTIONS, key=lambda q: -pref[q.objective])
    top = pref[ranked[0].objective]
    if top - pref[ranked[-1].objective] < 0.02:
        return f"A balance of {_join([q.phrase for q in QUESTIONS])}. {SAFETY_PHRASE}"
    focus = [q.phrase for q in ranked if pref[q.objective] >= 0.8 * top]
    return f"Mostly {_join(focus)}. {SAFETY_PHRASE}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
