"""What the grid's preference pairs teach besides their own objective, from the corpus raters' rankings alone (no
reward model, no judge, no eval data): for each objective k and pair selection, the share of rm-train pairs whose
chosen reply the raters also ranked above the rejected one on each other objective (a tie counts half).

A share near 1 means the pairs for k are pairs of "the better reply overall": an adapter trained on them learns what
every other adapter learns, and MODPO's margin on another objective can only reweight pairs that already agree with
it (MODPO 0.5/0.5 trains on empathy pairs; if their chosen replies are nearly always the safer ones too, it cannot
end far from DPO-empathy on safety). Also printed: the share of prompts that offer any discordant pair for k, one the
raters prefer on k while the other objectives, on average, prefer the other way.

    PYTHONPATH=. python scripts/pair_overlap.py [--rounds 1 2 3] [--counsel-chat PATH]
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from alignment.grid_data import SELECTIONS, Rated, corpus_rated
from alignment.objectives import OBJECTIVES

DEFAULT_CSV = "../shared/data/counsel_chat/counsel_chat.csv"


def agreement(items: list[Rated], objective: str, select: Callable[[Rated, str], tuple[str, str] | None]
              ) -> tuple[int, dict[str, float]]:
    """(pairs, {other objective: share of pairs whose chosen reply it ranks above the rejected one, ties half})."""
    wins = dict.fromkeys(OBJECTIVES, 0.0)
    n = 0
    for item in items:
        pair = select(item, objective)
        if pair is None:
            continue
        chosen, rejected = pair
        n += 1
        for o in OBJECTIVES:
            a, b = item.rank[o][chosen], item.rank[o][rejected]
            wins[o] += 1.0 if a < b else 0.5 if a == b else 0.0
    return n, {o: (w / n if n else float("nan")) for o, w in wins.items()}


def has_discordant(item: Rated, objective: str) -> bool:
    """Whether some pair is preferred on `objective` while the other objectives' mean rank prefers the other reply."""
    others = [o for o in OBJECTIVES if o != objective]
    ids = list(item.rank[objective])
    for c in ids:
        for r in ids:
            if item.rank[objective][c] < item.rank[objective][r] and \
                    np.mean([item.rank[o][c] - item.rank[o][r] for o in others]) > 0:
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 3], help="corpus rounds, each on its own")
    ap.add_argument("--counsel-chat", default=DEFAULT_CSV, help="counsel-chat CSV (its prompts' text)")
    args = ap.parse_args(argv)
    short = {o: o.split("_")[0][:8] for o in OBJECTIVES}
    for rnd in args.rounds:
        items = corpus_rated("rm-train", args.counsel_chat, log=lambda *a: None, rounds=(rnd,))
        print(f"\n## corpus round {rnd}: {len(items)} rm-train prompts")
        for name, select in SELECTIONS.items():
            print(f"\n{name} pairs: share whose chosen reply is also ranked above the rejected one on ...")
            print(f"| objective | pairs | {' | '.join(short[o] for o in OBJECTIVES)} | mean of the others |")
            print("|---|---|" + "---|" * (len(OBJECTIVES) + 1))
            for k in OBJECTIVES:
                n, share = agreement(items, k, select)
                rest = np.mean([share[o] for o in OBJECTIVES if o != k])
                print(f"| {k} | {n} | {' | '.join(f'{share[o]:.2f}' for o in OBJECTIVES)} | {rest:.2f} |")
        offer = {k: np.mean([has_discordant(it, k) for it in items]) for k in OBJECTIVES}
        print("\nprompts offering a discordant pair: " + ", ".join(f"{k} {v:.2f}" for k, v in offer.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
