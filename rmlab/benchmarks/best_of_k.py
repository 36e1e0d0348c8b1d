"""Best-of-K on any rankings or ratings data rmlab loads (PPE style: Frick et al. 2024, "How to Evaluate Reward
Models for RLHF", arXiv:2410.14872, the best-of-K metrics of its correctness benchmarks).

Each prompt's K responses carry a gold score (a rating, or minus the rank of a ranking). The reward model picks
the response with the highest reward; rewards tied at the top share the pick equally (as RewardBench 2 shares
its credit). Per prompt:
- ``acc``: the share of the pick that is a gold-best response (1 = it found the best of K);
- ``gold_picked``: the gold score of the pick, beside ``gold_best`` (the best available) and ``gold_mean`` (a
  random pick); ``regret = gold_best - gold_picked``; ``gap_closed = (gold_picked - gold_mean) /
  (gold_best - gold_mean)``: 0 = no better than chance, 1 = always the best.
Prompts whose K gold scores are all equal have no best and are left out (counted). The curve over K draws
``draws`` random K-subsets of each prompt (seeded) and averages, as PPE's best-of-K curves do.
"""

from __future__ import annotations

import math
import random
from typing import Any

from rmlab.benchmarks.common import BenchResult, Item, mean

NAN = float("nan")


def items_from_groups(groups: list[Any]) -> tuple[list[Item], dict[str, int]]:
    """Items from rmlab's ``PreferenceGroup``s: gold = scores, else -rank. Counts what is left out, and why."""
    items, dropped = [], {"no_gold_score": 0, "equal_gold_scores": 0, "one_response": 0}
    for g in groups:
        gold = None
        if g.scores is not None and any(s == s for s in g.scores):
            gold = [float(s) for s in g.scores]
        elif g.ranks is not None and any(r == r for r in g.ranks):
            gold = [-float(r) for r in g.ranks]
        if gold is None:
            dropped["no_gold_score"] += 1
            continue
        keep = [i for i, s in enumerate(gold) if not math.isnan(s)]
        if len(keep) < 2:
            dropped["one_response"] += 1
            continue
        gs = [gold[i] for i in keep]
        if max(gs) == min(gs):
            dropped["equal_gold_scores"] += 1
            continue
        items.append(Item(uid=g.group_id or g.source, subset=g.subset or "", prompt=g.prompt,
                          responses=[g.responses[i] for i in keep], n_chosen=0, gold=gs, where=g.source))
    return items, dropped


def pick(rewards: list[float], gold: list[float]) -> dict[str, float]:
    top = max(rewards)
    picked = [i for i, r in enumerate(rewards) if r == top]
    best = max(gold)
    return {
        "acc": sum(gold[i] == best for i in picked) / len(picked),
        "gold_picked": mean([gold[i] for i in picked]),
        "gold_best": best,
        "gold_mean": mean(gold),
    }


def curve(items: list[Item], rewards: list[list[float]], ks: list[int], draws: int, seed: int) -> dict[int, dict]:
    """Per K: acc, gold_picked and gold_best averaged over ``draws`` random K-subsets of each prompt with at least
    K responses (subsets whose gold scores are all equal count as no best: left out)."""
    rng = random.Random(seed)
    out = {}
    for k in ks:
        rows = []
        for it, rs in zip(items, rewards):
            if len(rs) < k:
                continue
            for _ in range(draws if len(rs) > k else 1):
                idx = rng.sample(range(len(rs)), k)
                g = [it.gold[i] for i in idx]
                if max(g) != min(g):
                    rows.append(pick([rs[i] for i in idx], g))
        if rows:
            out[k] = {key: mean([r[key] for r in rows]) for key in rows[0]} | {"n": len(rows)}
    return out


def score(items: list[Item], rewards: list[list[float]], ks: list[int] | None = None, draws: int = 20,
          seed: int = 0, dropped: dict[str, int] | None = None) -> BenchResult:
    rows, per_item, by_subset = [], [], {}
    for it, rs in zip(items, rewards):
        p = pick(rs, it.gold)
        p["gap_closed"] = (p["gold_picked"] - p["gold_mean"]) / (p["gold_best"] - p["gold_mean"])
        rows.append(p)
        by_subset.setdefault(it.subset, []).append(p["acc"])
        best = max(range(len(rs)), key=lambda i: (it.gold[i], -rs[i]))  # the gold best, the lowest-rewarded one
        chosen_pick = max(range(len(rs)), key=lambda i: (rs[i], -it.gold[i]))  # the pick, its worst on a tie
        per_item.append({"uid": it.uid, "subset": it.subset, "section": it.subset, "credit": p["acc"],
                         "margin": rs[best] - rs[chosen_pick], "chosen": best, "rejected": chosen_pick,
                         "k": len(rs)})
    s = {k: mean([r[k] for r in rows]) for k in ("acc", "gold_picked", "gold_best", "gold_mean", "gap_closed")}
    s["regret"] = s["gold_best"] - s["gold_picked"]
    s["n_examples"] = float(len(items))
    s["mean_k"] = mean([len(r) for r in rewards])
    for k, v in (dropped or {}).items():
        s[f"dropped/{k}"] = float(v)
    ks = ks or [k for k in (2, 4, 8, 16, 32, 64) if any(len(r) >= k for r in rewards)]
    cur = curve(items, rewards, ks, draws, seed)
    for k, row in cur.items():
        s[f"k{k}/acc"], s[f"k{k}/gold_picked"], s[f"k{k}/gold_best"] = row["acc"], row["gold_picked"], row["gold_best"]
    subsets = {k: (mean(v), len(v)) for k, v in sorted(by_subset.items())}
    sections = {k: a for k, (a, _) in subsets.items()}
    acc = s.pop("acc")
    return BenchResult("best_of_k", acc, sections, subsets, {k: k for k in subsets}, s, {"curve": cur}, per_item, [])
