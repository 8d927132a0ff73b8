"""Builds the on-policy corpus (alignment/corpus/): picks and splits the prompts, samples our own model's
replies with vLLM, and writes blind rating sheets. Counsel-chat text is never stored, only question ids;
labels come from raters (alignment/corpus/DATA_CARD.md), never from this module."""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

from alignment import prompts as P
from alignment.corpus_data import (CORPUS_DIR, GUIDELINE_VERSION, PROMPT_SPLITS, CorpusPrompt, load_prompts, read_jsonl, resolve_texts,
                              write_jsonl)
from alignment.generate import GenerationSettings

# What the prompts file is built from (issue: >= 600 prompts; the seed test split and counsel-chat val stay out).
CC_PROMPTS = 330
CC_MAX_WORDS = 130
SPLIT_SHARES = {"rm-train": 0.60, "rm-val": 0.12, "judge-train": 0.14, "test": 0.14}
BASE_SAMPLES = 5
SAMPLING = GenerationSettings(max_tokens=128, temperature=0.8, top_p=0.95, seed=0)
# Shipped adapters that add one reply each, spread over the prompts (one adapter per prompt).
VARIETY_ADAPTERS = ("sft", "dpo-safety", "modpo-empathy", "modpo-balanced")
# Round 2 (issue 13): the six emphasised MODPO adapters each write one reply to ROUND_PROMPTS rm-train prompts, so
# that a prompt's replies differ in which objective they serve rather than only in overall quality.
ROUND_EMPHASIS = {"empathy": "modpo-empathy", "safety": "modpo-safety", "active_listening": "modpo-listening",
                  "self_motivated_change": "modpo-change", "trust_rapport": "modpo-rapport",
                  "patient_autonomy": "modpo-autonomy"}
ROUND_ADAPTERS = tuple(ROUND_EMPHASIS.values())
ROUND_PROMPTS = 240


def _stable(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def build_prompts(counsel_chat: str | Path, corpus_dir: Path = CORPUS_DIR, seed: int = 0) -> list[CorpusPrompt]:
    """Counsel-chat train questions (stratified by topic, at most CC_MAX_WORDS words), seed train+val messages and
    the authored messages, each assigned to one split by a seeded shuffle stratified by source and risk."""
    from alignment.data import load_counsel_chat, load_seed, load_splits

    rng = random.Random(seed)
    rows = load_counsel_chat(counsel_chat)
    by_topic: dict[str, list] = defaultdict(list)
    seen = set()
    for r in rows:
        if r.split == "train" and r.questionID not in seen and r.prompt and len(r.prompt.split()) <= CC_MAX_WORDS:
            seen.add(r.questionID)
            by_topic[r.topic or "none"].append(r)
    pool = [r for topic in sorted(by_topic) for r in sorted(by_topic[topic], key=lambda r: r.questionID)]
    share = CC_PROMPTS / max(len(pool), 1)
    chosen = []
    for topic in sorted(by_topic):
        group = sorted(by_topic[topic], key=lambda r: _stable(seed, r.questionID))
        chosen += group[:max(1, round(len(group) * share))]
    chosen = sorted(chosen, key=lambda r: _stable(seed, "cc", r.questionID))[:CC_PROMPTS]
    out = [CorpusPrompt(id=f"cc-{r.questionID}", source="counsel_chat", ref=r.questionID, split="rm-train",
                        presentation=r.topic or None, crisis_risk=None, category=None) for r in chosen]
    seed_ids = set(load_splits()["train"]) | set(load_splits()["val"])
    out += [CorpusPrompt(id=f"seed-{ex.id}", source="seed", ref=ex.id, split="rm-train", presentation=ex.presentation,
                         crisis_risk=ex.crisis_risk, category=None) for ex in load_seed() if ex.id in seed_ids]
    for row in read_jsonl(corpus_dir / "authored.jsonl"):
        out.append(CorpusPrompt(id=row["id"], source="authored", ref=row["id"], split="rm-train",
                                presentation=row["presentation"], crisis_risk=row["crisis_risk"],
                                category=row["category"]))
    strata: dict[tuple, list[CorpusPrompt]] = defaultdict(list)
    for p in out:
        strata[(p.source, p.crisis_risk not in (None, "none"), p.category)].append(p)
    names, shares = list(SPLIT_SHARES), list(SPLIT_SHARES.values())
    carry = [0.0] * len(names)
    for key in sorted(strata, key=str):
        group = sorted(strata[key], key=lambda p: _stable(seed, "split", p.id))
        rng.shuffle(group)
        for p in group:  # largest remaining deficit first: every stratum spreads over every split
            carry = [c + s for c, s in zip(carry, shares)]
            j = max(range(len(names)), key=lambda i: carry[i])
            carry[j] -= 1.0
            p.split = names[j]
    return out


def reply_id(prompt_id: str, model: str, index: int) -> str:
    """An opaque id: raters see it, and it says nothing about which model wrote the reply."""
    return "r" + _stable("reply", prompt_id, model, index)[:8]


def adapter_for(prompt_id: str) -> str:
    """The shipped adapter that writes a prompt's extra reply (by a hash of the id, so about a quarter each)."""
    return VARIETY_ADAPTERS[int(_stable("adapter", prompt_id)[:8], 16) % len(VARIETY_ADAPTERS)]


def sample_corpus(base_model: str, store_dir: Path, counsel_chat: str | Path, corpus_dir: Path = CORPUS_DIR,
                  chunk: int = 60, log=print) -> Path:
    """BASE_SAMPLES replies per prompt from the base model and one from its `adapter_for` adapter, from one vLLM
    engine (LoRA per request), in chunks of prompts appended to samples.jsonl as each finishes. Resumable:
    prompts already in samples.jsonl are skipped."""
    return _sample(base_model, store_dir, counsel_chat, corpus_dir, VARIETY_ADAPTERS,
                   lambda pid: [("base", BASE_SAMPLES), (adapter_for(pid), 1)], lambda pid, model, k:
                   reply_id(pid, model, k), chunk, log)


def round_dir(n: int) -> Path:
    """Round 1 is the corpus itself; round n > 1 (replies of the adapters trained on the rounds before it, to the
    same prompts) lives in alignment/corpus/round<n>/ with its own prompts, samples and labels files."""
    if n < 1:
        raise ValueError(f"round {n}: rounds count from 1")
    return CORPUS_DIR if n == 1 else CORPUS_DIR / f"round{n}"


def corpus_rounds() -> list[int]:
    """The rounds present: 1 and every alignment/corpus/round<n>/ with a prompts file."""
    later = (d.name[len("round"):] for d in CORPUS_DIR.glob("round*") if (d / "prompts.jsonl").exists())
    return [1, *sorted(int(n) for n in later if n.isdigit() and int(n) > 1)]


def round_prompts(n: int, count: int = ROUND_PROMPTS, split: str = "rm-train", seed: int = 0) -> list[CorpusPrompt]:
    """A seeded sample of `count` of round 1's `split` prompts, same ids and split, for round n."""
    pool = sorted((p for p in load_prompts(CORPUS_DIR) if p.split == split), key=lambda p: _stable(seed, n, p.id))
    if count > len(pool):
        raise ValueError(f"round {n}: {count} prompts asked, {split} has {len(pool)}")
    return sorted(pool[:count], key=lambda p: p.id)


def sample_round(n: int, base_model: str, store_dir: Path, counsel_chat: str | Path,
                 adapters: tuple[str, ...] = ROUND_ADAPTERS, count: int = ROUND_PROMPTS, chunk: int = 40,
                 log=print) -> Path:
    """Round n > 1: one reply per adapter of `adapters` to each of `count` rm-train prompts (the prompts file is
    written on the first call and kept after), same sampling as round 1. Reply ids are opaque and differ from
    round 1's; resumable like `sample_corpus`."""
    if n < 2:
        raise ValueError("round 1 is `attune corpus sample` without --round")
    folder = round_dir(n)
    if not (folder / "prompts.jsonl").exists():
        write_jsonl(round_prompts(n, count), folder / "prompts.jsonl")
    return _sample(base_model, store_dir, counsel_chat, folder, adapters, lambda pid: [(a, 1) for a in adapters],
                   lambda pid, model, k: reply_id(pid, f"round{n}/{model}", k), chunk, log)


def _sample(base_model: str, store_dir: Path, counsel_chat, corpus_dir: Path, adapters, jobs_of, id_of,
            chunk: int, log) -> Path:
    """`jobs_of(prompt id)` -> [(model, replies)] ('base' or an adapter of `adapters`) for every prompt of
    corpus_dir's prompts file not yet in its samples file; one engine, rows appended per chunk of prompts."""
    from vllm import SamplingParams

    from alignment.generate import VLLMGenerator, engine_label

    prompts = load_prompts(corpus_dir)
    texts = resolve_texts(prompts, counsel_chat, corpus_dir)
    out_path = corpus_dir / "samples.jsonl"
    done = {r["prompt_id"] for r in read_jsonl(out_path)} if out_path.exists() else set()
    todo = [p.id for p in prompts if p.id not in done]
    if not todo:
        return out_path
    gen = VLLMGenerator(base_model, memory_fraction=0.1, max_loras=len(adapters), seed=SAMPLING.seed)
    engine = engine_label(dtype=gen.dtype)  # what the rows record: the dtype this generator runs in
    lora = {name: gen._lora(Path(store_dir) / name) for name in adapters}
    params = {}
    t0 = time.perf_counter()
    try:
        for i in range(0, len(todo), chunk):
            ids = todo[i:i + chunk]
            jobs = [(pid, model, n) for pid in ids for model, n in jobs_of(pid)]
            for _, _, n in jobs:
                params.setdefault(n, SamplingParams(n=n, max_tokens=SAMPLING.max_tokens,
                                                    temperature=SAMPLING.temperature, top_p=SAMPLING.top_p))
            outs = gen.llm.chat([P.chat(texts[pid]) for pid, _, _ in jobs], [params[n] for _, _, n in jobs],
                                lora_request=[None if m == "base" else lora[m] for _, m, _ in jobs], use_tqdm=False)
            with open(out_path, "a", encoding="utf-8") as f:
                for (pid, model, n), o in zip(jobs, outs):
                    row = {"prompt_id": pid, "model": model, "base_model": "smollm2-135m-instruct",
                           "engine": engine, "sampling": asdict(SAMPLING), "n": n,
                           "replies": [{"id": id_of(pid, model, k), "text": c.text.strip()}
                                       for k, c in enumerate(o.outputs)]}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            log(f"sampled {i + len(ids)}/{len(todo)} prompts ({time.perf_counter() - t0:.0f} s)")
    finally:
        gen.close()
    return out_path


LETTERS = "ABCDEFGH"


def rating_sheets(counsel_chat: str | Path, prompt_ids: list[str], out: Path, *, seed: int, name: str,
                  corpus_dir: Path = CORPUS_DIR) -> tuple[Path, Path]:
    """A blind sheet for a rater (markdown: each prompt's message and its replies under letters, shuffled by
    `seed`; nothing says which model wrote a reply) and its key (letters -> reply ids), kept from the rater."""
    from alignment.corpus_data import load_samples

    prompts = {p.id: p for p in load_prompts(corpus_dir)}
    texts = resolve_texts([prompts[i] for i in prompt_ids], counsel_chat, corpus_dir)
    samples = load_samples(corpus_dir)
    rng = random.Random(seed)
    lines, key = [f"# Rating sheet {name}\n"], {}
    for n, pid in enumerate(prompt_ids, 1):
        replies = [r.id for r in samples[pid]]
        rng.shuffle(replies)
        key[pid] = dict(zip(LETTERS, replies))
        by_id = {r.id: r.text for r in samples[pid]}
        lines.append(f"## {n}. prompt_id: {pid}\n\n**Patient:** {texts[pid]}\n")
        lines += [f"**{letter}:** {by_id[rid]}\n" for letter, rid in key[pid].items()]
    out.mkdir(parents=True, exist_ok=True)
    sheet, key_path = out / f"{name}.md", out / f"{name}.key.json"
    sheet.write_text("\n".join(lines))
    key_path.write_text(json.dumps(key, indent=1) + "\n")
    return sheet, key_path


def parse_ranking(text: str, letters: list[str]) -> dict[str, int]:
    """'C>A=B>D' -> {'C': 1, 'A': 2, 'B': 2, 'D': 4} (competition ranks: ties share the better rank)."""
    ranks, position = {}, 1
    for group in text.replace(" ", "").upper().split(">"):
        members = [m for m in group.split("=") if m]
        for m in members:
            if m not in letters or m in ranks:
                raise ValueError(f"ranking {text!r}: {m!r} is unknown or appears twice (replies {letters})")
            ranks[m] = position
        position += len(members)
    return ranks


def import_ratings(raw: Path, key: Path, rater: str, labelling_pass: int, out: Path,
                   guideline_version: str = GUIDELINE_VERSION) -> int:
    """A rater's answers ({prompt_id, rank: {objective: 'C>A=B>...'}, safety: {letter: 'safe' | 'label:reason'}})
    in the label format, letters mapped back to reply ids by the sheet's key. Returns the rows written."""
    from alignment.corpus_data import LabelRow

    mapping = json.loads(key.read_text())
    rows = []
    for lineno, row in enumerate(read_jsonl(raw), 1):
        pid = row.get("prompt_id")
        if pid not in mapping:
            raise ValueError(f"{raw}:{lineno}: prompt_id {pid!r} is not on this sheet")
        letters = list(mapping[pid])
        try:
            parsed = {o: parse_ranking(v, letters) for o, v in row["rank"].items()}
            for o, ranks in parsed.items():
                if set(ranks) != set(letters):
                    raise ValueError(f"rank.{o} must order every reply {letters}; missing {sorted(set(letters) - set(ranks))}")
            if set(m.upper() for m in row["safety"]) != set(letters):
                raise ValueError(f"safety must label every reply {letters}")
            rank = {o: {mapping[pid][m]: r for m, r in ranks.items()} for o, ranks in parsed.items()}
            safety = {}
            for m, v in row["safety"].items():
                label, _, reason = v.partition(":")
                if (label.strip() == "safe") != (reason.strip() in ("", "none")):
                    raise ValueError(f"safety.{m}: {v!r}: a safe reply has no reason; borderline/unsafe need one")
                safety[mapping[pid][m.upper()]] = {"label": label.strip(), "reason": reason.strip() or "none"}
            rows.append(LabelRow(prompt_id=pid, rater=rater, guideline_version=guideline_version,
                                 labelling_pass=labelling_pass, rank=rank, safety=safety, note=row.get("note", "")))
        except (KeyError, ValueError, AttributeError) as e:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"{raw}:{lineno}: {e}") from None
    write_jsonl(rows, out)
    return len(rows)


def summary(corpus_dir: Path = CORPUS_DIR) -> dict:
    prompts = load_prompts(corpus_dir)
    return {"prompts": len(prompts), "by_split": dict(Counter(p.split for p in prompts)),
            "by_source": dict(Counter(p.source for p in prompts)),
            "splits_allowed": list(PROMPT_SPLITS)}


if __name__ == "__main__":  # a rater checks their answers file: python -m alignment.corpus_build ANSWERS KEY
    import sys
    import tempfile as _tmp

    with _tmp.TemporaryDirectory() as d:
        n = import_ratings(Path(sys.argv[1]), Path(sys.argv[2]), "check", 1, Path(d) / "x.jsonl")
        want = len(json.loads(Path(sys.argv[2]).read_text()))
        print(f"ok: {n} of {want} prompts labelled, every line valid" if n == want else
              f"valid so far: {n} of {want} prompts labelled")
