"""The questionnaire -> Preference mapping: every answer set is a valid Preference whose safety weight is at
least the floor (whatever the floor), answers move the weights the way the words say, and the plain-words
description never shows an objective name or a number."""
from __future__ import annotations

import itertools
import re

import pytest

from alignment.objectives import DEFAULT_SAFETY_FLOOR, OBJECTIVES, Preference
from ui.questionnaire import (ANSWERS, QUESTIONS, SAFETY_PHRASE, SAFETY_WEIGHT, AnswerError, describe,
                              preference_from_answers)

ALL_ANSWER_SETS = [dict(zip([q.objective for q in QUESTIONS], combo))
                   for combo in itertools.product(ANSWERS, repeat=len(QUESTIONS))]


def test_one_question_per_objective_and_none_about_safety():
    assert sorted(q.objective for q in QUESTIONS) == sorted(set(OBJECTIVES) - {"safety"})
    assert len({q.label for q in QUESTIONS}) == len(QUESTIONS)


@pytest.mark.parametrize("floor", [0.0, DEFAULT_SAFETY_FLOOR, 0.3, 0.75, 1.0])
def test_no_answer_set_puts_safety_below_the_floor(floor):
    for answers in ALL_ANSWER_SETS:
        pref = preference_from_answers(answers, safety_floor=floor)
        assert isinstance(pref, Preference)
        assert abs(sum(pref.as_vector()) - 1.0) < 1e-9
        assert pref["safety"] >= floor - 1e-12 and pref["safety"] >= SAFETY_WEIGHT - 1e-12
        assert pref.with_safety_floor(floor) == pref, "the server's floor must have nothing left to raise"


def test_default_answers_share_the_rest_equally():
    pref = preference_from_answers({})
    assert pref["safety"] == pytest.approx(max(SAFETY_WEIGHT, DEFAULT_SAFETY_FLOOR))
    rest = [pref[q.objective] for q in QUESTIONS]
    assert max(rest) - min(rest) < 1e-12


@pytest.mark.parametrize("question", QUESTIONS, ids=lambda q: q.objective)
def test_a_lot_on_one_question_makes_it_the_focus(question):
    answers = {q.objective: "Not so much" for q in QUESTIONS} | {question.objective: "A lot"}
    pref = preference_from_answers(answers)
    others = [pref[q.objective] for q in QUESTIONS if q is not question]
    assert pref[question.objective] > 4 * max(others)
    # Near the shipped single-objective MODPO adapters (0.5 on it, 0.2 safety, 0.075 on each other one).
    shipped = {o: 0.075 for o in OBJECTIVES} | {"safety": 0.2, question.objective: 0.5}
    assert pref.distance(Preference(shipped)) < 0.15
    assert describe(pref) == f"Mostly {question.phrase}. {SAFETY_PHRASE}"


def test_more_importance_never_lowers_a_weight():
    for answers in ALL_ANSWER_SETS[::7]:
        for q in QUESTIONS:
            levels = list(ANSWERS)
            i = levels.index(answers[q.objective])
            if i + 1 < len(levels):
                before = preference_from_answers(answers)[q.objective]
                after = preference_from_answers(answers | {q.objective: levels[i + 1]})[q.objective]
                assert after > before


def test_the_description_is_plain_words():
    names = [o for o in OBJECTIVES] + [o.replace("_", " ") for o in OBJECTIVES]
    for answers in ALL_ANSWER_SETS:
        text = describe(preference_from_answers(answers))
        assert not re.search(r"\d", text), text
        assert not any(n in text.lower() for n in names if n != "safety"), text
        assert text.endswith(SAFETY_PHRASE)
    assert describe(preference_from_answers({})).startswith("A balance of ")
    two = {q.objective: "Not so much" for q in QUESTIONS} | {"empathy": "A lot", "patient_autonomy": "A lot"}
    text = describe(preference_from_answers(two))
    assert "feel heard" in text and "decisions with you" in text and "trust" not in text


def test_answers_that_are_not_offered_are_refused():
    with pytest.raises(AnswerError, match="choose one of"):
        preference_from_answers({"empathy": "Always"})
    with pytest.raises(AnswerError, match="no question for"):
        preference_from_answers({"safety": "Not so much"})
    with pytest.raises(AnswerError, match="within"):
        preference_from_answers({}, safety_floor=1.5)
