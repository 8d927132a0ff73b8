"""Seed data: the shipped set meets the issue's shape; bad input names file, line and field."""
import json
from collections import Counter

import pytest

from alignment import data
from alignment.objectives import OBJECTIVES

GOOD = {"id": "x-01", "presentation": "anxiety", "crisis_risk": "none", "message": "I worry a lot.",
        "replies": [{"text": "That sounds hard.", "ratings": {o: 4 for o in OBJECTIVES}},
                    {"text": "Stop worrying.", "ratings": {o: 2 for o in OBJECTIVES}}]}


def test_shipped_seed_set_has_the_required_shape():
    ex = data.load_seed()
    assert len(ex) >= 150
    assert sum(e.is_crisis for e in ex) >= 30
    assert {e.crisis_risk for e in ex} >= {"passive", "active", "plan"}
    counts = Counter(e.presentation for e in ex)
    assert set(counts) == {"anxiety", "depression", "grief", "relationships", "substance_use", "trauma",
                           "work_stress", "loneliness"}
    assert all(len(e.replies) >= 4 for e in ex)


def test_splits_partition_by_message_and_cover_crisis():
    ex = data.load_seed()
    s = data.load_splits()
    ids = [i for part in s.values() for i in part]
    assert len(ids) == len(set(ids)) == len(ex)
    crisis = {e.id for e in ex if e.is_crisis}
    for part in ("train", "val", "test"):
        assert crisis & set(s[part]), f"{part} has no crisis messages"


def _write(tmp_path, obj_or_line):
    p = tmp_path / "part-z.jsonl"
    p.write_text((obj_or_line if isinstance(obj_or_line, str) else json.dumps(obj_or_line)) + "\n")
    return tmp_path


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r["replies"][0]["ratings"].update(empathy=6), "replies.0.ratings"),
    (lambda r: r["replies"][1]["ratings"].update(kindness=3), "replies.1.ratings"),
    (lambda r: r.update(crisis_risk="maybe"), "crisis_risk"),
    (lambda r: r.update(extra=1), "extra"),
    (lambda r: r["replies"][0]["ratings"].pop("safety"), "replies.0.ratings"),
])
def test_bad_record_names_file_line_and_field(tmp_path, mutate, field):
    rec = json.loads(json.dumps(GOOD))
    mutate(rec)
    d = _write(tmp_path, rec)
    with pytest.raises(data.DataError) as e:
        data.load_seed(d)
    msg = str(e.value)
    assert "part-z.jsonl:1" in msg and field in msg


def test_malformed_json_line_is_an_error_not_a_skip(tmp_path):
    d = _write(tmp_path, json.dumps(GOOD) + "\n{not json")
    with pytest.raises(data.DataError, match=r"part-z.jsonl:2: not valid JSON"):
        data.load_seed(d)


def test_duplicate_id_across_lines_is_rejected(tmp_path):
    d = _write(tmp_path, json.dumps(GOOD) + "\n" + json.dumps(GOOD))
    with pytest.raises(data.DataError, match="already used"):
        data.load_seed(d)


def test_seed_pairs_prefer_higher_rating():
    ex = data.SeedExample.model_validate(GOOD)
    pairs = data.seed_pairs([ex])
    assert len(pairs) == len(OBJECTIVES)
    assert all(p.chosen == "That sounds hard." and p.gap == 2 for p in pairs)


def test_counsel_chat_loader(counsel_chat_csv):
    rows = data.load_counsel_chat(counsel_chat_csv)
    assert len(rows) > 1000
    val = data.counsel_chat_questions(rows, "val")
    assert len(val) == len(set(val)) > 50
    sft = data.counsel_chat_sft(rows, "train")
    assert sft and all(q and a for q, a in sft)


def test_counsel_chat_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_counsel_chat(tmp_path / "nope.csv")
