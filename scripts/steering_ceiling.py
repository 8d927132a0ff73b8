"""How much steering the judge can register at all, from the replies of the last `attune eval`
(reports/eval_replies.jsonl): the six emphasised MODPO adapters' replies to each held-out prompt, scored by the judge.

Steering accuracy for objective k credits a prompt when the adapter emphasising k writes the reply the judge ranks
first on k among the six. When the judge ranks the same reply first on several objectives, at most one of those
objectives can be credited on that prompt, so the mean accuracy over the six objectives can be no higher than the
mean number of distinct first-ranked replies per prompt, divided by 6, whatever the adapters write. This prints:
- steering accuracy as `attune eval` computes it (a check: it should match reports/alignment.md);
- that ceiling for these replies (distinct winners / 6), and the best mean any one-to-one map from adapters to
  objectives would get on them (what relabelling the same replies could reach);
- how alike the judge's six objective scores are: the mean correlation between two objectives' scores of the six
  replies to one prompt (prompt means removed), beside the same for the six replies' ranks (Kendall's tau-b).
Reporting only; nothing is tuned on it.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/steering_ceiling.py [--replies reports/eval_replies.jsonl]
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np


def distinct_winners(scores: np.ndarray) -> np.ndarray:
    """scores [prompts, adapters, objectives] -> per prompt, the number of different adapters ranked first on some
    objective (ties: the first listed)."""
    return np.array([len(set(np.argmax(p, axis=0).tolist())) for p in scores])


def best_relabelling(scores: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """The mean accuracy of the best one-to-one map from adapters to objectives over all prompts, and the map
    (objective k -> adapter perm[k])."""
    wins = np.zeros((scores.shape[1], scores.shape[2]))  # [adapter, objective]: prompts it is first on
    for p in scores:
        for k, a in enumerate(np.argmax(p, axis=0)):
            wins[a, k] += 1
    best = max(itertools.permutations(range(scores.shape[1])), key=lambda perm: sum(wins[perm[k], k]
                                                                                    for k in range(len(perm))))
    return float(sum(wins[best[k], k] for k in range(len(best))) / (len(scores) * len(best))), best


def objective_agreement(scores: np.ndarray) -> tuple[float, float]:
    """Mean over objective pairs of (Pearson r of prompt-centred scores, Kendall's tau-b within each prompt)."""
    from scipy.stats import kendalltau

    centred = scores - scores.mean(axis=1, keepdims=True)
    k = scores.shape[2]
    rs, taus = [], []
    for i, j in itertools.combinations(range(k), 2):
        rs.append(np.corrcoef(centred[:, :, i].ravel(), centred[:, :, j].ravel())[0, 1])
        t = [kendalltau(p[:, i], p[:, j]).statistic for p in scores]
        taus.append(np.nanmean(t))
    return float(np.mean(rs)), float(np.mean(taus))


def main() -> None:
    from adapters.registry import AdapterStore
    from alignment.objectives import OBJECTIVES
    from alignment.reward import RewardModel
    from attune.paths import JUDGE_DIR, REPORTS_DIR, STORE_DIR
    from evals import stats

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replies", default=str(REPORTS_DIR / "eval_replies.jsonl"))
    a = ap.parse_args()
    rows = [json.loads(line) for line in Path(a.replies).read_text().splitlines() if line.strip()]
    store = AdapterStore(STORE_DIR)
    emphasis = stats.emphasised(store.entry(i) for i in store.ids())
    objectives = [o for o in OBJECTIVES if o in emphasis]
    names = [emphasis[o] for o in objectives]
    prompts = [r["prompt"] for r in rows]
    judge = RewardModel.load(JUDGE_DIR)
    judged = {n: np.asarray(judge.score(prompts, [r["replies"][n] for r in rows])) for n in names}
    acc = stats.steering_accuracy(judged, emphasis, list(OBJECTIVES), resamples=200)
    # [prompts, adapters (in objective order), objectives]
    scores = np.stack([judged[n][:, [OBJECTIVES.index(o) for o in objectives]] for n in names], axis=1)
    distinct = distinct_winners(scores)
    relabelled, perm = best_relabelling(scores)
    r, tau = objective_agreement(scores)
    print(f"{len(rows)} prompts, {len(names)} emphasised adapters, judge {JUDGE_DIR.name}")
    print("steering accuracy: " + ", ".join(f"{o} {acc[o]['accuracy']:.2f}" for o in objectives)
          + f"; mean {np.mean([acc[o]['accuracy'] for o in objectives]):.3f}")
    print(f"distinct first-ranked replies per prompt: mean {distinct.mean():.2f} of {len(names)} "
          f"(counts {dict(sorted(zip(*np.unique(distinct, return_counts=True))))}); ceiling on mean accuracy "
          f"{distinct.mean() / len(names):.3f}")
    print(f"best one-to-one relabelling of the same replies: mean {relabelled:.3f} ("
          + ", ".join(f"{o} <- {names[perm[k]]}" for k, o in enumerate(objectives)) + ")")
    print(f"judge's objectives alike within a prompt: mean Pearson r {r:.2f} (prompt means removed), "
          f"mean Kendall tau-b {tau:.2f} over the six replies' ranks")


if __name__ == "__main__":
    main()
