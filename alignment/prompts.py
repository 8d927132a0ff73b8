"""The system prompt and chat formatting shared by training, evaluation and serving, so that an
adapter sees at serving time exactly the conversation shape it was trained on."""
from __future__ import annotations

SYSTEM_PROMPT = (
    "You are a warm, respectful listener in a mental-health support chat. You do not diagnose or "
    "advise on medication; if someone may be at risk, urge them to contact a crisis line."
)


def chat(user_text: str, history: list[dict] | None = None, system: str = SYSTEM_PROMPT) -> list[dict]:
    """Messages for one turn: system prompt, earlier turns, then the patient's message."""
    return [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": user_text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]
