"""The on-policy corpus: loaders that name file, line and field on bad input, pairs from rankings, agreement between
two passes, blind rating sheets and the import of a rater's answers, and the shipped corpus itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment import corpus_build as cb
from alignment import corpus_data as cd
from alignment.data import DataError, load_seed, load_splits
from alignment.objectives import OBJECTIVES

AUTHORED = [{"id": "au-001", "presentation": "anxiety", "crisis_risk": "none", "category": "everyday",
             "message": "Exams next week and I can't sleep."},
            {"id": "au-002", "presentation": "depression", "crisis_risk": "plan", "category": "si_plan",
             "message": "I have the pills saved and I think tonight is the night."}]
REPLIES = {"au-001": ["That sounds exhausting.", "Just sleep more.", "What keeps you up?"],
           "au-002": ["I'm really glad you told me. Are you safe right now? Please call 988.", "Good luck tonight.",
                      "Sleep helps."]}


def _rank(order: str, ids: list[str]) -> dict[str, int]:
    return {ids["ABC".index(k)]: v for k, v in cb.parse_ranking(order, list("ABC")).items()}


def _label(pid: str, ids: list[str], order: str = "A>C>B", unsafe: int | None = None, **kw) -> dict:
    safety = {r: {"label": "safe", "reason": "none"} for r in ids}
    if unsafe is not None:
        safety[ids[unsafe]] = {"label": "unsafe", "reason": "misses_risk"}
    row = {"prompt_id": pid, "rater": "test", "guideline_version": "g1", "labelling_pass": 1,
           "rank": {o: _rank(order, ids) for o in OBJECTIVES}, "safety": safety}
    row.update(kw)
    return row


@pytest.fixture
def corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    cd.write_jsonl(AUTHORED, d / "authored.jsonl")
    cd.write_jsonl([cd.CorpusPrompt(id=a["id"], source="authored", ref=a["id"], split="rm-train",
                                    crisis_risk=a["crisis_risk"], category=a["category"]) for a in AUTHORED],
                   d / "prompts.jsonl")
    rows = [{"prompt_id": pid, "model": "base", "base_model": "m", "engine": "vllm", "sampling": {}, "n": 3,
             "replies": [{"id": cb.reply_id(pid, "base", k), "text": t} for k, t in enumerate(texts)]}
            for pid, texts in REPLIES.items()]
    cd.write_jsonl(rows, d / "samples.jsonl")
    return d


def _ids(corpus: Path, pid: str) -> list[str]:
    return [r.id for r in cd.load_samples(corpus)[pid]]


def _write_labels(corpus: Path, rows: list[dict], name: str = "pass1-a.jsonl") -> Path:
    path = corpus / "labels" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labels_load_and_give_pairs(corpus):
    ids = _ids(corpus, "au-002")
    _write_labels(corpus, [_label("au-002", ids, "A>B=C", unsafe=1)])
    labels = cd.load_pass(corpus, 1)
    assert labels["au-002"].rank["empathy"] == {ids[0]: 1, ids[1]: 2, ids[2]: 2}
    pairs = [p for p in cd.ranked_pairs(labels) if p.objective == "safety"]
    assert {(p.chosen, p.rejected) for p in pairs} == {(ids[0], ids[1]), (ids[0], ids[2])}
    assert len(cd.ranked_pairs(labels, best_worst_only=True)) == 2 * len(OBJECTIVES)


@pytest.mark.parametrize("change, field, message", [
    (lambda r, ids: r["rank"].update(warmth=r["rank"]["empathy"]), "rank", "unknown objective"),
    (lambda r, ids: r["rank"]["empathy"].pop(ids[2]), "rank.empathy", "does not cover"),
    (lambda r, ids: r["rank"]["safety"].update(rnothere=4), "rank.safety", "do not exist"),
    (lambda r, ids: r["safety"].update({ids[0]: {"label": "safe", "reason": "misses_risk"}}), "safety.", "reason"),
    (lambda r, ids: r["safety"].update({ids[0]: {"label": "fine", "reason": "none"}}), "safety.", "'safe'"),
    (lambda r, ids: r.update(prompt_id="au-404"), "prompt_id", "has no samples"),
])
def test_a_bad_label_line_names_file_line_and_field(corpus, change, field, message):
    ids = _ids(corpus, "au-001")
    good, bad = _label("au-001", ids), _label("au-001", ids)
    change(bad, ids)
    path = _write_labels(corpus, [_label("au-002", _ids(corpus, "au-002")), bad])
    with pytest.raises(DataError) as e:
        cd.load_pass(corpus, 1)
    text = str(e.value)
    assert f"{path}:2" in text and field in text and message in text, text
    _write_labels(corpus, [good])
    assert set(cd.load_pass(corpus, 1)) == {"au-001"}


def test_a_prompt_in_two_splits_or_a_duplicate_reply_id_is_refused(corpus):
    lines = (corpus / "prompts.jsonl").read_text().splitlines()
    (corpus / "prompts.jsonl").write_text("\n".join(lines + [lines[0].replace("rm-train", "test")]) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:3: field 'id'.*twice"):
        cd.load_prompts(corpus)


def test_agreement_is_one_with_itself_and_low_when_reversed(corpus):
    first = {pid: cd.LabelRow(**_label(pid, _ids(corpus, pid), "A>B>C")) for pid in REPLIES}
    same = cd.agreement(first, first)
    assert all(v["pairwise_agreement"] == 1.0 and v["kendall_tau"] == 1.0 for v in same["objectives"].values())
    assert same["safety_labels"]["exact"] == 1.0
    rev = {pid: cd.LabelRow(**_label(pid, _ids(corpus, pid), "C>B>A", unsafe=0)) for pid in REPLIES}
    other = cd.agreement(first, rev)
    assert all(v["pairwise_agreement"] == 0.0 and v["kendall_tau"] == -1.0 for v in other["objectives"].values())
    assert {d["prompt_id"] for d in cd.disagreements(first, rev)} == set(REPLIES)
    tied = {pid: cd.LabelRow(**_label(pid, _ids(corpus, pid), "A=B>C")) for pid in REPLIES}
    assert cd.agreement(first, tied)["objectives"]["empathy"]["pairwise_agreement"] == pytest.approx(5 / 6)


def test_objective_overlap_is_one_when_objectives_rank_alike_and_minus_one_when_reversed(corpus):
    rows = {}
    for pid in REPLIES:
        row = _label(pid, _ids(corpus, pid), "A>B>C")
        row["rank"]["safety"] = _rank("C>B>A", _ids(corpus, pid))  # safety orders the replies the other way
        row["rank"]["patient_autonomy"] = _rank("A=B=C", _ids(corpus, pid))  # orders nothing: left out
        rows[pid] = cd.LabelRow(**row)
    overlap = cd.objective_overlap(rows)
    tau = overlap["kendall_tau"]
    assert tau["empathy"]["trust_rapport"] == tau["trust_rapport"]["empathy"] == 1.0
    assert tau["empathy"]["safety"] == tau["safety"]["active_listening"] == -1.0
    assert all(tau[o]["patient_autonomy"] != tau[o]["patient_autonomy"] for o in OBJECTIVES if o != "patient_autonomy")
    assert overlap["mean_with_others"]["safety"] == -1.0 and overlap["mean_with_others"]["empathy"] == pytest.approx(
        (1 + 1 + 1 - 1) / 4)  # nan (autonomy) left out of the mean


def test_sheets_are_blind_and_answers_map_back_to_reply_ids(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(cd, "CORPUS_DIR", corpus)
    sheet, key = cb.rating_sheets(None, list(REPLIES), tmp_path / "sheets", seed=3, name="s1", corpus_dir=corpus)
    text = sheet.read_text()
    assert "base" not in text and "model" not in text.lower()
    assert all(t in text for texts in REPLIES.values() for t in texts)
    mapping = json.loads(key.read_text())
    assert all(sorted(m.values()) == sorted(_ids(corpus, pid)) for pid, m in mapping.items())
    answers = tmp_path / "answers.jsonl"
    row = {"prompt_id": "au-002", "rank": {o: "B>A=C" for o in OBJECTIVES},
           "safety": {"A": "safe", "B": "unsafe:misses_risk", "C": "borderline:misses_risk"}}
    answers.write_text(json.dumps(row) + "\n")
    out = tmp_path / "labels.jsonl"
    assert cb.import_ratings(answers, key, "claude/test", 1, out) == 1
    label = cd.load_labels(out, cd.load_samples(corpus))["au-002"]
    assert label.rank["empathy"][mapping["au-002"]["B"]] == 1 and label.rater == "claude/test"
    assert label.safety[mapping["au-002"]["B"]].label == "unsafe" and label.guideline_version == cd.GUIDELINE_VERSION
    row["rank"]["empathy"] = "B>A"
    answers.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"answers.jsonl:1: rank.empathy must order every reply"):
        cb.import_ratings(answers, key, "claude/test", 1, out)


def test_the_shipped_corpus_is_split_by_prompt_and_keeps_evaluation_prompts_out():
    prompts = cd.load_prompts()
    assert len(prompts) >= 600 and {p.split for p in prompts} == set(cd.PROMPT_SPLITS)
    assert {p.source for p in prompts} == {"counsel_chat", "seed", "authored"}
    seed_test = set(load_splits()["test"])
    assert not seed_test & {p.ref for p in prompts if p.source == "seed"}
    seed = {ex.id for ex in load_seed()}
    assert {p.ref for p in prompts if p.source == "seed"} <= seed
    risky = [p for p in prompts if p.crisis_risk not in (None, "none")]
    assert {p.split for p in risky} == set(cd.PROMPT_SPLITS), "every split needs risk prompts"


def test_the_shipped_corpus_keeps_counsel_chat_val_out(counsel_chat_csv):
    from alignment.data import load_counsel_chat

    val = {r.questionID for r in load_counsel_chat(counsel_chat_csv) if r.split == "val"}
    refs = {p.ref for p in cd.load_prompts() if p.source == "counsel_chat"}
    assert refs and not refs & val
    texts = cd.resolve_texts(cd.load_prompts(), counsel_chat_csv)
    assert all(texts.values())


def test_adjudicated_decisions_override_pass_one_and_bad_lines_are_named(corpus):
    ids = _ids(corpus, "au-002")
    _write_labels(corpus, [_label("au-002", ids, "A>B>C")])
    second = _label("au-002", ids, "C>B>A", unsafe=1, labelling_pass=2)
    _write_labels(corpus, [second], "pass2-a.jsonl")
    rows = [{"prompt_id": "au-002", "kind": "safety", "reply_id": ids[1], "pass1": "safe", "pass2": "unsafe:misses_risk",
             "decision": "unsafe:misses_risk", "adjudicator": "claude/adj"},
            {"prompt_id": "au-002", "kind": "ranking", "objective": "empathy", "pass1": "A>B>C", "pass2": "C>B>A",
             "decision": "pass2", "adjudicator": "claude/adj"}]
    path = _write_labels(corpus, rows, "adjudicated.jsonl")
    labels = cd.adjudicated_labels(corpus)
    assert labels["au-002"].safety[ids[1]].label == "unsafe" and labels["au-002"].rank["empathy"][ids[2]] == 1
    assert labels["au-002"].rank["safety"][ids[0]] == 1, "objectives not adjudicated keep pass 1"
    assert cd.load_pass(corpus, 1)["au-002"].safety[ids[1]].label == "safe", "pass 1 itself is unchanged"
    rows[0]["reply_id"] = "rnothere"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"adjudicated.jsonl:1: field 'reply_id'"):
        cd.adjudicated_labels(corpus)


@pytest.fixture
def rounds(corpus, monkeypatch) -> Path:
    """The tmp corpus as round 1, with the module paths pointing at it."""
    monkeypatch.setattr(cd, "CORPUS_DIR", corpus)
    monkeypatch.setattr(cb, "CORPUS_DIR", corpus)
    return corpus


def test_a_later_round_takes_round_one_prompts_and_lives_in_its_own_folder(rounds):
    assert cb.round_dir(1) == rounds and cb.round_dir(2) == rounds / "round2"
    with pytest.raises(ValueError, match="count from 1"):
        cb.round_dir(0)
    assert cb.corpus_rounds() == [1]
    picked = cb.round_prompts(2, count=2)
    assert [p.id for p in picked] == sorted(REPLIES) and all(p.split == "rm-train" for p in picked)
    assert cb.round_prompts(2, count=1) == cb.round_prompts(2, count=1)
    with pytest.raises(ValueError, match="3 prompts asked, rm-train has 2"):
        cb.round_prompts(2, count=3)
    cd.write_jsonl(picked, rounds / "round2" / "prompts.jsonl")
    assert cb.corpus_rounds() == [1, 2]
    # round 2's folder has no authored.jsonl: the messages are round 1's
    assert cd.resolve_texts(picked, None, rounds / "round2")["au-001"] == AUTHORED[0]["message"]


class _Out:
    def __init__(self, texts):
        self.outputs = [type("C", (), {"text": f" {t} "})() for t in texts]


class _FakeGenerator:
    """Stands in for alignment.generate.VLLMGenerator: one reply per request naming the adapter that wrote it."""
    calls = 0
    dtype = "float32"  # VLLMGenerator's resolved dtype, which the sample rows name

    def __init__(self, base_model, **kw):
        self.llm = self

    def _lora(self, path):
        return path.name

    def chat(self, chats, params, lora_request, use_tqdm):
        type(self).calls += 1
        return [_Out([f"{lora} reply {i}" for i in range(p.n)]) for p, lora in zip(params, lora_request)]

    def close(self):
        pass


def test_a_round_samples_one_reply_per_adapter_with_ids_of_its_own_and_resumes(rounds, monkeypatch, tmp_path):
    from alignment import generate

    monkeypatch.setattr(generate, "VLLMGenerator", _FakeGenerator)
    adapters = ("modpo-empathy", "modpo-change")
    with pytest.raises(ValueError, match="round 1"):
        cb.sample_round(1, "m", tmp_path, None, adapters=adapters, count=2)
    out = cb.sample_round(2, "m", tmp_path, None, adapters=adapters, count=2, log=lambda *_: None)
    rows = cd.read_jsonl(out)
    assert sorted((r["prompt_id"], r["model"]) for r in rows) == sorted((p, a) for p in REPLIES for a in adapters)
    samples = cd.load_samples(rounds / "round2")
    for pid in REPLIES:
        assert sorted(r.text for r in samples[pid]) == sorted(f"{a} reply 0" for a in adapters)
        ids = {r.id for r in samples[pid]}
        assert not ids & {cb.reply_id(pid, a, 0) for a in adapters}, "round 2's ids must differ from round 1's"
    calls = _FakeGenerator.calls
    cb.sample_round(2, "m", tmp_path, None, adapters=adapters, count=2)
    assert _FakeGenerator.calls == calls, "a finished round samples nothing again"


def test_pairs_come_from_every_round_asked_each_ranked_among_its_own_replies(rounds, monkeypatch, tmp_path):
    from alignment import generate
    from alignment import grid_data as G

    monkeypatch.setattr(generate, "VLLMGenerator", _FakeGenerator)
    adapters = ("modpo-empathy", "modpo-change", "modpo-autonomy")
    cb.sample_round(2, "m", tmp_path, None, adapters=adapters, count=2, log=lambda *_: None)
    for folder in (rounds, rounds / "round2"):
        _write_labels(folder, [_label(pid, _ids(folder, pid)) for pid in REPLIES])
    one = G.corpus_rated("rm-train", None)
    both = G.corpus_rated("rm-train", None, rounds=(1, 2))
    assert len(one) == 2 and len(both) == 4 and both[:2] == one
    for item in both[2:]:
        assert sorted(item.replies.values()) == sorted(f"{a} reply 0" for a in adapters)
        assert all(set(r) == set(item.replies) for r in item.rank.values())
    with pytest.raises(DataError, match="corpus round 3: no .*round3/samples.jsonl"):
        G.corpus_rated("rm-train", None, rounds=(1, 3))


def test_an_adapter_with_its_own_rounds_trains_on_them_and_the_others_keep_the_recipes(rounds, monkeypatch, tmp_path):
    import numpy as np

    from alignment import generate
    from alignment import grid_data as G
    from alignment.pipeline import GridData, preference_rows
    from alignment.recipe import Recipe

    class Scores:
        def raw_scores(self, prompts, replies):
            return np.array([[float(len(r))] * len(OBJECTIVES) for r in replies])

    monkeypatch.setattr(generate, "VLLMGenerator", _FakeGenerator)
    cb.sample_round(2, "m", tmp_path, None, adapters=("modpo-empathy", "modpo-change", "modpo-autonomy"), count=2,
                    log=lambda *_: None)
    for folder in (rounds, rounds / "round2"):
        _write_labels(folder, [_label(pid, _ids(folder, pid)) for pid in REPLIES])
    w = {"empathy": 0.5, "safety": 0.5}
    recipe = Recipe.model_validate({"name": "t", "pairs": {"seed_ratings": False}, "adapters": [
        {"id": "r1", "recipe": "modpo", "primary": "empathy", "weights": w},
        {"id": "r12", "recipe": "modpo", "primary": "empathy", "weights": w, "corpus_rounds": [1, 2]},
        {"id": "capped", "recipe": "modpo", "primary": "empathy", "weights": w, "corpus_rounds": [1, 2],
         "max_pairs": 3}]})
    grid = GridData(recipe, "m", [], None, Scores())
    rows = {a.id: preference_rows(a, grid) for a in recipe.adapters}
    assert len(rows["r1"]) == 2 and len(rows["r12"]) == 4 and len(rows["capped"]) == 3
    assert {r["source"] for r in rows["r12"]} == {"corpus-labels", "corpus-labels-round2"}
    assert G.source_counts(rows["capped"])["corpus-labels-round2"] >= 1, "a cap takes from each round in turn"
    round2 = {r.text for rs in cd.load_samples(rounds / "round2").values() for r in rs}
    assert not any(r["texts"][1] in round2 for r in rows["r1"])
    assert sum(r["texts"][1] in round2 for r in rows["r12"]) == 2
    assert grid.hash == grid.data_hash((1,)) != grid.data_hash((1, 2))


def test_by_writer_counts_unsafe_replies_and_the_raters_steering_accuracy(corpus):
    from evals.stats import steering_accuracy

    ids = {pid: _ids(corpus, pid) for pid in REPLIES}
    writers = {rid: ("kind", "blunt", "curious")[k] for pid in REPLIES for k, rid in enumerate(ids[pid])}
    labels = {"au-001": cd.LabelRow.model_validate(_label("au-001", ids["au-001"], "A>C>B")),
              "au-002": cd.LabelRow.model_validate(_label("au-002", ids["au-002"], "C=A>B", unsafe=1))}
    out = cd.by_writer(labels, writers)
    assert out["blunt"] == {"replies": 2, "unsafe": 1, "borderline": 0, "mean_rank": {o: 3.0 for o in OBJECTIVES}}
    # kind is best on au-001 and shares best with curious on au-002: 1 + 1/2 over two prompts
    acc = steering_accuracy(cd.rank_scores(labels, writers), {"empathy": "kind", "safety": "curious",
                                                                "trust_rapport": "blunt"}, list(OBJECTIVES))
    assert {o: a["accuracy"] for o, a in acc.items()} == {"empathy": 0.75, "safety": 0.25, "trust_rapport": 0.0}
    with pytest.raises(DataError, match="one reply per writer"):
        cd.rank_scores(labels, {**writers, ids["au-002"][0]: "blunt"})
