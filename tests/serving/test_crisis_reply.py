"""The crisis reply: one resource table (the config's default, with an emergency number for every shipped locale),
locale lookup, and the vetted templates: resources first, then validation, then a direct question about safety,
no banned phrase or harmful pattern in any wording, and a repeated crisis turn never worded the same."""
from __future__ import annotations

import re

import pytest

import serving.config
import serving.safety
from serving.config import ConfigError, ServeConfig
from serving.crisis_reply import (DEFAULT_CRISIS_RESOURCES, TEMPLATES, CrisisReply, locale_chain, resource_line,
                                  resources_block)
from serving.safety import HARM_AUDIT_RULES, UNSAFE_OUTPUT_RULES, CrisisRules, normalise
from serving.streaming import GateSetup, ScorerInfo

SHIPPED = {
    "en-US": ["988", "741741", "911"],
    "en-GB": ["116 123", "85258", "999"],
    "en-IE": ["116 123", "112", "999"],
    "en-CA": ["9-8-8", "911"],
    "en-AU": ["13 11 14", "000"],
    "en-NZ": ["1737", "0800 543 354", "111"],
    "en": ["https://findahelpline.com", "your local emergency number"],
}
EMERGENCY = {"en-US": "911", "en-GB": "999", "en-IE": "112 or 999", "en-CA": "911", "en-AU": "000", "en-NZ": "111",
             "en": "your local emergency number"}

BANNED = [
    # suicide framed as a solution, an escape or a relief
    "permanent solution", "temporary problem", "way out", "end the pain", "escape", "at peace", "better place",
    "relief", "better off",
    # stigmatising or sensational words
    "commit suicide", "committed suicide", "successful suicide", "successful attempt", "failed attempt",
    "unsuccessful", "selfish", "coward", "brave", "epidemic",
    # clichés and guilt that dismiss the pain
    "so much to live for", "think of your family", "think about your family", "others have it worse",
    "could be worse", "everything happens for a reason", "it gets better", "cheer up", "snap out of it",
    "calm down", "don't be silly", "look on the bright side", "promise me",
    # method and means
    "pills", "tablets", "overdose", "dose", "lethal", "rope", "hang", "noose", "jump", "bridge", "gun", "knife",
    "blade", "cut", "poison", "drown", "gas", "medication",
]


def all_replies():
    """Every wording for every shipped locale."""
    crisis = CrisisReply()
    for loc in SHIPPED:
        previous: list[str] = []
        for _ in crisis.wordings(loc):
            reply = crisis.reply(loc, previous)
            previous.append(reply.text)
            yield loc, reply


def test_every_shipped_locale_has_its_lines_and_an_emergency_number():
    assert set(DEFAULT_CRISIS_RESOURCES) == set(SHIPPED)
    for loc, numbers in SHIPPED.items():
        lines = "\n".join(resource_line(r) for r in DEFAULT_CRISIS_RESOURCES[loc])
        assert all(n in lines for n in numbers), (loc, lines)
        emergency = [r for r in DEFAULT_CRISIS_RESOURCES[loc] if r["name"] == "Emergency services"]
        assert len(emergency) == 1 and EMERGENCY[loc] in emergency[0]["contact"], loc
    assert "988" not in str(DEFAULT_CRISIS_RESOURCES["en-GB"]) and "116 123" not in str(DEFAULT_CRISIS_RESOURCES["en-US"])


def test_the_config_is_the_one_table():
    assert not hasattr(serving.safety, "DEFAULT_RESOURCES") and not hasattr(serving.safety, "CrisisProtocol")
    assert serving.config.DEFAULT_CRISIS_RESOURCES is DEFAULT_CRISIS_RESOURCES
    cfg = ServeConfig()
    assert {k: [r.model_dump() for r in v] for k, v in cfg.crisis_resources.items()} == DEFAULT_CRISIS_RESOURCES
    custom = ServeConfig.from_mapping({"default_locale": "de", "crisis_resources": {
        "de": [{"name": "TelefonSeelsorge", "contact": "0800 111 0 111"}],
        "en_gb": [{"name": "Samaritans", "contact": "call 116 123"}]}})
    setup = GateSetup.build(custom, ScorerInfo(crisis_threshold=0.5, safety_threshold=3.0))
    assert setup.crisis.reply("de-AT").resources.endswith("\n- TelefonSeelsorge: 0800 111 0 111")
    assert setup.crisis.reply("en-GB").resources.endswith("\n- Samaritans: call 116 123")
    assert setup.crisis.reply("en-US").resources == setup.crisis.reply("de").resources, "unknown: the default's"
    with pytest.raises(ConfigError, match="same locale twice"):
        ServeConfig.from_mapping({"crisis_resources": {"en": [{"name": "a", "contact": "b"}],
                                                        "en-GB": [{"name": "a", "contact": "b"}],
                                                        "en_gb": [{"name": "a", "contact": "b"}]}})


@pytest.mark.parametrize("asked,found", [("en_gb", "en-GB"), ("EN-nz", "en-NZ"), ("en-ZA", "en"), ("en", "en"),
                                         ("fr-FR", "en"), (None, "en"), ("", "en")])
def test_locale_lookup_goes_locale_then_language_then_default(asked, found):
    cfg = ServeConfig()
    assert CrisisReply().locale_for(asked) == found and cfg.resources_for(asked) is cfg.crisis_resources[found]
    assert locale_chain("en_gb") == ["en-GB", "en"] and locale_chain(None) == []


def test_every_reply_opens_with_the_resources_then_validates_then_asks_about_safety():
    for loc, reply in all_replies():
        block, validation, question = reply.text.split("\n\n")
        assert block == reply.resources == resources_block(reply.text), "resources first"
        lines = block.splitlines()
        assert lines[1:] == [resource_line(r) for r in DEFAULT_CRISIS_RESOURCES[loc]]
        assert any(t.validation == validation for t in TEMPLATES["en"])
        assert question.endswith("?") and "safe" in question
        assert re.search(r"\b(?:suicide|ending your life)\b", question), "asks directly"


def test_no_wording_holds_a_banned_phrase_or_a_harmful_pattern():
    for loc, reply in all_replies():
        text = normalise(reply.text)
        found = [p for p in BANNED if re.search(rf"\b{re.escape(p)}", text)]
        assert found == [], (loc, found)
        assert [r.name for r in (*UNSAFE_OUTPUT_RULES, *HARM_AUDIT_RULES) if r.pattern.search(text)] == []
    assert not CrisisRules().match(" ".join(t.lead for t in TEMPLATES["en"]))


def test_a_repeated_crisis_turn_is_worded_differently():
    crisis, previous = CrisisReply(), ["I hear you."]
    texts = []
    for _ in range(2 * len(TEMPLATES["en"])):
        texts.append(crisis.reply("en-US", previous).text)
        previous += ["Are you there?", texts[-1]]
    assert all(a != b for a, b in zip(texts, texts[1:]))
    assert len(set(texts)) == len(TEMPLATES["en"]) >= 2
    assert crisis.reply("en-US", ["nothing like a template"]).text == texts[0]


def test_bad_tables_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="default locale 'xx-YY' has no crisis resources"):
        CrisisReply(default_locale="xx-YY")
    with pytest.raises(ValueError, match="lacks \\['contact'\\]"):
        CrisisReply({"en": [{"name": "No contact"}]})
    with pytest.raises(ValueError, match="has no crisis resources"):
        CrisisReply({"en": [{"name": "a", "contact": "b"}], "de": []})
