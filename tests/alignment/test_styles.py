"""Objective style instructions: steering by prompting alone, a baseline for `attune eval tune --prompt-styles`."""
from alignment import prompts as P
from alignment import styles
from alignment.objectives import OBJECTIVES


def test_each_objective_has_its_own_instruction_on_top_of_the_shared_system_prompt():
    prompts = {o: styles.system_prompt(o) for o in OBJECTIVES}
    assert len(set(prompts.values())) == len(OBJECTIVES)
    assert all(p.startswith(P.SYSTEM_PROMPT + " ") for p in prompts.values())
    assert styles.system_prompt(None) == P.SYSTEM_PROMPT
    assert styles.styled_chat("hi", "safety")[0] == {"role": "system", "content": prompts["safety"]}
