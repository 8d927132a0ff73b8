"""The `attune corpus ...` and `attune reward ...` commands: the on-policy corpus (prompts, samples, blind rating
sheets, label import and checks), reward model v2 with its judge, and their report. Plain functions whose keyword
arguments are the flags (the dispatch table is in attune/cli.py)."""
from __future__ import annotations

import json
from pathlib import Path


def _cc(counsel_chat: str | None) -> str:
    from attune.paths import DEFAULT_COUNSEL_CHAT

    return counsel_chat or str(DEFAULT_COUNSEL_CHAT)


def corpus_prompts(counsel_chat: str | None = None, force: bool = False) -> int:
    """Pick the corpus prompts and fix their splits (alignment/corpus/prompts.jsonl). Run once, before training."""
    from alignment.corpus_build import build_prompts, summary
    from alignment.corpus_data import CORPUS_DIR, write_jsonl

    path = CORPUS_DIR / "prompts.jsonl"
    if path.exists() and not force:
        print(f"{path} exists; splits are fixed before training (pass --force to remake)")
        return 1
    write_jsonl(build_prompts(_cc(counsel_chat)), path)
    print(json.dumps(summary(), indent=1))
    return 0


def corpus_sample(counsel_chat: str | None = None, base_model: str | None = None, store: str | None = None,
                  round_no: int = 1, prompts: int | None = None) -> int:
    """Sample our model's replies to every corpus prompt with vLLM (resumes where samples.jsonl stops); with
    round > 1, the emphasised adapters' replies to a sample of rm-train prompts (alignment/corpus/round<N>/)."""
    from alignment.basemodel import resolve
    from alignment.corpus_build import ROUND_PROMPTS, sample_corpus, sample_round
    from attune.paths import STORE_DIR

    store_dir = Path(store) if store else STORE_DIR
    if round_no == 1:
        print(sample_corpus(resolve(base_model), store_dir, _cc(counsel_chat)))
    else:
        print(sample_round(round_no, resolve(base_model), store_dir, _cc(counsel_chat),
                           count=prompts or ROUND_PROMPTS))
    return 0


def corpus_sheets(labelling_pass: int = 1, size: int = 60, share: float = 0.16, out: str = "build/corpus/sheets",
                  seed: int = 0, counsel_chat: str | None = None, round_no: int = 1) -> int:
    """Write blind rating sheets (and their keys) for the prompts that have samples but no label in this pass and
    are on no sheet of this pass in `out` yet, so that it can run again as sampling finishes each chunk.

    Pass 1 covers every prompt; pass 2 a `share` of them, picked by a hash of the seed and the prompt id (the same
    prompts whenever it runs), on freshly shuffled sheets."""
    import hashlib
    import random

    from alignment.corpus_build import rating_sheets, round_dir
    from alignment.corpus_data import load_pass, load_samples

    folder = round_dir(round_no)
    samples = load_samples(folder)
    done = load_pass(folder, labelling_pass=labelling_pass, samples=samples)
    prefix = f"{'' if round_no == 1 else f'round{round_no}-'}pass{labelling_pass}-s{seed}-"
    keys = sorted(Path(out).glob(f"{prefix}*.key.json"))
    sheeted = {pid for k in keys for pid in json.loads(k.read_text())}
    todo = [p for p in samples if p not in done and p not in sheeted]
    if labelling_pass == 2:
        todo = [p for p in todo
                if int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:8], 16) < share * 2 ** 32]
    random.Random(seed + labelling_pass + len(keys)).shuffle(todo)
    for i in range(0, len(todo), size):
        name = f"{prefix}{len(keys) + i // size + 1:02d}"
        sheet, key = rating_sheets(_cc(counsel_chat), todo[i:i + size], Path(out), seed=seed * 1000 + len(keys) + i,
                                   name=name, corpus_dir=folder)
        print(f"{sheet} ({len(todo[i:i + size])} prompts; key {key})")
    return 0


def corpus_import(answers: str | None = None, key: str | None = None, rater: str | None = None,
                  labelling_pass: int = 1, out: str | None = None, round_no: int = 1) -> int:
    """Turn a rater's answers file (letters, as on the sheet) into labels (reply ids) under alignment/corpus/labels
    (round<N>/labels for round N > 1)."""
    import sys

    from alignment.corpus_build import import_ratings, round_dir

    if not (answers and key and rater):
        print("give ANSWERS KEY --rater WHO, e.g. attune corpus import raw/pass1-01.jsonl sheets/pass1-01.key.json "
              "--rater claude/helper-3", file=sys.stderr)
        return 2

    stem = Path(answers).stem
    stem = stem if stem.startswith(f"pass{labelling_pass}-") else f"pass{labelling_pass}-{stem}"
    target = Path(out) if out else round_dir(round_no) / "labels" / f"{stem}.jsonl"
    n = import_ratings(Path(answers), Path(key), rater, labelling_pass, target)
    print(f"{target}: {n} prompts")
    return 0


def corpus_check(counsel_chat: str | None = None, round_no: int | None = None) -> int:
    """Validate every corpus file (prompts, samples, labels of both passes); print sizes and agreement. Every round
    in turn, or only `round_no`."""
    from alignment.corpus_build import corpus_rounds

    rounds = [round_no] if round_no else corpus_rounds()
    for n in rounds:
        if len(rounds) > 1 or n > 1:
            print(f"round {n}:")
        _check_round(n, counsel_chat)
    return 0


def _check_round(round_no: int, counsel_chat: str | None) -> None:
    from collections import Counter

    from alignment.corpus_build import ROUND_EMPHASIS, round_dir
    from alignment.corpus_data import (agreement, by_writer, load_pass, load_prompts, load_samples,
                                       objective_overlap, rank_scores, resolve_texts, sample_models)
    from alignment.objectives import OBJECTIVES

    folder = round_dir(round_no)
    prompts = load_prompts(folder)
    resolve_texts(prompts, _cc(counsel_chat), folder)
    samples = load_samples(folder)
    first, second = (load_pass(folder, labelling_pass=n, samples=samples) for n in (1, 2))
    by_split = Counter(p.split for p in prompts)
    labelled = Counter(p.split for p in prompts if p.id in first)
    labels = Counter(lab.label for row in first.values() for lab in row.safety.values())
    print(f"prompts: {len(prompts)} {dict(by_split)}")
    print(f"samples: {sum(len(v) for v in samples.values())} replies for {len(samples)} prompts")
    print(f"labels: pass 1 {len(first)} prompts {dict(labelled)}, safety {dict(labels)}; pass 2 {len(second)}")
    if second:
        print(json.dumps(agreement(first, second), indent=1))
    if not first:
        return
    writers = sample_models(folder)
    print("by writer (unblinded, pass 1): " + "; ".join(f"{w} {v['unsafe']}/{v['replies']} unsafe"
                                                         for w, v in by_writer(first, writers).items()))
    if round_no > 1:
        from evals.stats import steering_accuracy

        acc = steering_accuracy(rank_scores(first, writers), ROUND_EMPHASIS, list(OBJECTIVES))
        print("raters' steering accuracy (the emphasising adapter's reply ranked best on its objective; chance "
              f"1/{len(ROUND_EMPHASIS)}): " + ", ".join(f"{o} {a['accuracy']:.2f}" for o, a in acc.items()))
    overlap = objective_overlap(first)
    print(f"objectives go together (pass 1, mean Kendall's tau-b between two objectives' rankings of the same "
          f"replies, {overlap['prompts']} prompts): {overlap['mean_between_objectives']:.2f} on average; each with "
          f"the others: " + ", ".join(f"{o} {t:.2f}" for o, t in overlap["mean_with_others"].items()))


def reward_train(encoder: str | None = None, judge_encoder: str | None = None, out: str | None = None,
                 judge_out: str | None = None, counsel_chat: str | None = None, max_steps: int = 0) -> int:
    """Train reward model v2 (rm-train) and the judge (judge-train) on the on-policy corpus; print test accuracy."""
    from alignment.reward_training import train_and_save
    from attune.paths import JUDGE_DIR, REWARD_DIR

    metrics = train_and_save(Path(out) if out else REWARD_DIR, Path(judge_out) if judge_out else JUDGE_DIR,
                             encoder=encoder, judge_encoder=judge_encoder, counsel_chat=_cc(counsel_chat),
                             max_steps=max_steps)
    print(json.dumps(metrics, indent=2))
    return 0


def reward_report(out: str | None = None, counsel_chat: str | None = None, reward_dir: str | None = None,
                  judge_dir: str | None = None, old_dir: str | None = None) -> int:
    """Old vs new reward model vs judge on the corpus test split: reports/reward.{json,md}, reward_calibration.png."""
    from evals import reward_report as rr
    from attune.paths import JUDGE_DIR, REPORTS_DIR, REPO_ROOT, REWARD_DIR

    report = rr.build(_cc(counsel_chat), Path(reward_dir or REWARD_DIR), Path(judge_dir or JUDGE_DIR),
                      Path(old_dir or REPO_ROOT / "alignment" / "baselines" / "reward-v1"))
    for path in rr.write(report, Path(out) if out else REPORTS_DIR):
        print(path)
    return 0


def crisis_train(out: str | None = None, counsel_chat: str | None = None, epochs: int = 6,
                 max_steps: int = 0) -> int:
    """Train the crisis detector on alignment/corpus/crisis + the labelled corpus messages, calibrate it on val,
    save it (default adapters/store/crisis, registered in the store's manifest) and print its val figures."""
    from alignment.crisis_training import CrisisTrainArgs, build_sets, train_detector
    from alignment.reward_training import _register
    from attune.paths import STORE_DIR

    folder = Path(out) if out else STORE_DIR / "crisis"
    model, meta = train_detector(build_sets(_cc(counsel_chat)),
                                 args=CrisisTrainArgs(epochs=epochs, max_steps=max_steps or None))
    model.save(folder)
    _register(folder)
    print(json.dumps(meta, indent=2))
    return 0


def crisis_calibrate(detector_dir: str | None = None, counsel_chat: str | None = None, target_recall: float = 0.99,
                     margin: float = 0.15) -> int:
    """Set a trained crisis detector's thresholds again on val, without training: its config.json changes, its
    weights do not; re-registered in the store's manifest (sign the store again after)."""
    from alignment.crisis import CrisisClassifier
    from alignment.crisis_training import CrisisTrainArgs, build_sets, recalibrate
    from alignment.reward_training import _register
    from attune.paths import STORE_DIR

    folder = Path(detector_dir) if detector_dir else STORE_DIR / "crisis"
    model = CrisisClassifier.load(folder)
    before = model.config.threshold
    calibration = recalibrate(model, build_sets(_cc(counsel_chat))["val"],
                              CrisisTrainArgs(target_recall=target_recall, threshold_margin=margin))
    model.save_config(folder)
    _register(folder)
    print(f"threshold {before:.5f} -> {model.config.threshold:.5f}, near {model.config.near_threshold:.5f}")
    print(json.dumps(calibration, indent=2))
    return 0


def crisis_report(out: str | None = None, counsel_chat: str | None = None, detector_dir: str | None = None) -> int:
    """The crisis detector on val, test, hard negatives and counsel-chat val: reports/crisis.{json,md}."""
    from evals import crisis_report as cr
    from attune.paths import REPORTS_DIR, STORE_DIR

    report = cr.build(_cc(counsel_chat), Path(detector_dir) if detector_dir else STORE_DIR / "crisis")
    for path in cr.write(report, Path(out) if out else REPORTS_DIR):
        print(path)
    return 0


def reward_gate(false_rejection: float = 0.05, reward_dir: str | None = None, counsel_chat: str | None = None) -> int:
    """Choose the output gate's threshold on reward model v2's safety classifier for a stated false-rejection rate
    on rm-val replies labelled safe; saved in the model's config (meta.gate) and re-registered."""
    from alignment.reward import RewardModel
    from alignment.reward_training import _register, calibrate_gate
    from attune.paths import REWARD_DIR

    if not 0.0 < false_rejection < 0.5:
        print(f"--false-rejection {false_rejection}: give a rate between 0 and 0.5, e.g. 0.05")
        return 2
    folder = Path(reward_dir) if reward_dir else REWARD_DIR
    rm = RewardModel.load(folder)
    gate = calibrate_gate(rm, _cc(counsel_chat), false_rejection)
    rm.save(folder)
    _register(folder)
    print(json.dumps(gate, indent=2))
    return 0


def crisis_splits() -> int:
    """Give every new row of alignment/corpus/crisis/authored-*.jsonl its split (rows that have one keep it)."""
    from alignment.crisis_training import CRISIS_DIR, fix_splits

    for path in sorted(CRISIS_DIR.glob("authored-*.jsonl")):
        print(f"{path.name}: {fix_splits(path)} new rows split")
    return 0
