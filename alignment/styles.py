"""Objective style instructions: the shared system prompt plus one sentence asking for what the labelling guidelines
(g1, alignment/corpus/DATA_CARD.md) call better on one objective. Steering by prompting alone, the baseline an
adapter per objective has to beat (`attune eval tune --prompt-styles`); never used in serving or training."""
from __future__ import annotations

from alignment import prompts as P
from alignment.objectives import OBJECTIVES

STYLE_INSTRUCTIONS: dict[str, str] = {
    "empathy": "Above all, name the feeling the person describes and validate it warmly, without judgement.",
    "safety": "Above all, keep the person safe: if there is any sign of risk, ask gently whether they are safe and "
              "point them to a crisis line or a professional; never suggest anything harmful.",
    "active_listening": "Above all, reflect back the specific things the person said, in their own words, and ask "
                        "one open question about them.",
    "self_motivated_change": "Above all, help the person find their own reasons for change and ask what small next "
                             "step would feel doable to them.",
    "trust_rapport": "Above all, be genuine and respectful in plain words, thank them for sharing, and invite them "
                     "to keep talking.",
    "patient_autonomy": "Above all, leave every decision with the person: offer a few options rather than orders "
                        "and ask what feels right to them.",
}
assert set(STYLE_INSTRUCTIONS) == set(OBJECTIVES)


def system_prompt(objective: str | None) -> str:
    """The shared system prompt, with the objective's instruction appended (None: the plain prompt)."""
    if objective is None:
        return P.SYSTEM_PROMPT
    return f"{P.SYSTEM_PROMPT} {STYLE_INSTRUCTIONS[objective]}"


def styled_chat(user_text: str, objective: str | None) -> list[dict]:
    return P.chat(user_text, system=system_prompt(objective))
