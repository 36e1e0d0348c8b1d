"""From scored or ranked responses to comparisons, and from many records to one group per prompt.

Ratings data (AlpacaEval, HelpSteer2, Prometheus) has one score per response and often one record per
response, so the groups are built after all records are read: records are merged by prompt text (and
subset: a group has one), the responses of a prompt are capped at ``max_k`` (the dropped responses'
records are counted), and the
comparisons come from the scores (``all`` pairs, ``best_vs_rest`` or ``adjacent`` in score order) with
the score gap as the margin and equal scores as ties.
"""

from __future__ import annotations

import hashlib
import random
from itertools import combinations

from rmlab.data.types import Comparison, DataReport, PreferenceGroup

PAIRINGS = ("all", "best_vs_rest", "adjacent")


def comparisons_from_scores(
    scores: list[float], pairing: str = "all", tie_eps: float = 0.0, with_margin: bool = True
) -> list[Comparison]:
    """Comparisons among responses with these scores (higher is better).

    all: every C(K,2) pair; best_vs_rest: the top response against each other one (K-1);
    adjacent: neighbours in score order (K-1). ``|gap| <= tie_eps`` is a tie. The margin is the
    absolute gap (None when ``with_margin`` is off, e.g. for ranks that carry no scale).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"data.format_options.pairing={pairing!r} is not one of {PAIRINGS}")
    k = len(scores)
    order = sorted(range(k), key=lambda i: (-scores[i], i))  # best first; stable on ties
    if pairing == "all":
        pairs = list(combinations(range(k), 2))
    elif pairing == "best_vs_rest":
        pairs = [(order[0], j) for j in order[1:]]
    else:
        pairs = list(zip(order, order[1:]))
    out = []
    for a, b in pairs:
        gap = scores[a] - scores[b]
        w, lo = (a, b) if gap >= 0 else (b, a)
        out.append(Comparison(w, lo, margin=abs(gap) if with_margin else None, tie=abs(gap) <= tie_eps))
    return out


def pick_k(scores: list[float], max_k: int, strategy: str, key: str) -> list[int]:
    """Indices of the responses to keep when a prompt has more than ``max_k``.

    random: a uniform sample, seeded by the prompt (the same prompt always keeps the same responses).
    spread: evenly spaced in score order (best and worst always kept), so the kept pairs span the
    whole score range instead of clustering where most scores lie.
    """
    k = len(scores)
    if max_k is None or k <= max_k:
        return list(range(k))
    if max_k < 2:
        raise ValueError("data.format_options.max_k must be at least 2 (a group needs two responses)")
    if strategy == "random":
        seed = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
        return sorted(random.Random(seed).sample(range(k), max_k))
    if strategy == "spread":
        order = sorted(range(k), key=lambda i: (-scores[i], i))
        return sorted(order[round(j * (k - 1) / (max_k - 1))] for j in range(max_k))
    raise ValueError(f"data.format_options.max_k_strategy={strategy!r} is not random|spread")


def merge_by_prompt(groups: list[PreferenceGroup], report: DataReport) -> list[PreferenceGroup]:
    """Fold groups that share a prompt and a subset into one group, in order of first appearance.

    Responses are matched by exact text, so a response compared in several records is forwarded
    once. A ratings record whose (prompt, response) was already seen is a duplicate: it is dropped and
    counted, since two scores for one response cannot both stand.

    The subset is part of the key because a group has one subset and per-subset accuracy reads it
    for every comparison of the group: records of the same prompt in different subsets stay separate
    groups with the same prompt text (the train/val split is by prompt text, so they stay together).
    """
    merged: dict[tuple[str, str | None], PreferenceGroup] = {}
    for g in groups:
        m = merged.get((g.prompt, g.subset))
        if m is None:
            m = merged[(g.prompt, g.subset)] = PreferenceGroup(
                prompt=g.prompt,
                responses=[],
                comparisons=[],
                group_id=g.group_id,
                subset=g.subset,
                source=g.source,
                n_records=0,
                templated=g.templated,
                scores=[] if g.scores is not None else None,
                attributes=[] if g.attributes is not None else None,
                critiques=[] if g.critiques is not None else None,
            )
        index = {r: i for i, r in enumerate(m.responses)}
        if g.scores is not None and any(r in index for r in g.responses):
            report.drop("duplicate", g.n_records)
            report.kept -= g.n_records
            continue
        local = []
        for j, r in enumerate(g.responses):
            if r not in index:
                index[r] = len(m.responses)
                m.responses.append(r)
                if m.scores is not None:
                    m.scores.append(g.scores[j])
                if m.attributes is not None:
                    m.attributes.append(g.attributes[j])
                if m.critiques is not None:
                    m.critiques.append(g.critiques[j] if g.critiques is not None else "")
            local.append(index[r])
        for c in g.comparisons:
            c.winner, c.loser = local[c.winner], local[c.loser]
            m.comparisons.append(c)
        m.n_records += g.n_records
    return list(merged.values())


def finish_rated(
    g: PreferenceGroup,
    report: DataReport,
    pairing: str,
    tie_eps: float,
    max_k: int | None,
    strategy: str,
    per_response_records: bool,
) -> PreferenceGroup | None:
    """Cap a rated group at ``max_k`` responses and build its comparisons from the scores.

    With one record per response (long-form ratings) a response left out is a dropped record
    (``over_max_k``); with one record holding all responses (wide form) it is counted under
    ``truncated.responses_over_max_k``, since the record itself is kept.
    """
    keep = pick_k(g.scores, max_k, strategy, g.prompt)
    n_out = len(g.responses) - len(keep)
    if n_out and per_response_records:
        report.drop("over_max_k", n_out)
        report.kept -= n_out
        g.n_records -= n_out
    elif n_out:
        report.truncated["responses_over_max_k"] += n_out
    g.responses = [g.responses[i] for i in keep]
    g.scores = [g.scores[i] for i in keep]
    if g.attributes is not None:
        g.attributes = [g.attributes[i] for i in keep]
    if g.critiques is not None:
        g.critiques = [g.critiques[i] for i in keep]
    if len(g.responses) < 2:
        report.drop("single_response_prompt", g.n_records)
        report.kept -= g.n_records
        return None
    g.comparisons = comparisons_from_scores(g.scores, pairing, tie_eps)
    return g
