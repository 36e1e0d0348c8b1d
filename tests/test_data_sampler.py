"""Grouped-prompt batching: whole prompts per batch, budgets, length buckets, rank sharding, epochs, splits."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from rmlab.data.collate import collate
from rmlab.data.grouping import comparisons_from_scores
from rmlab.data.sampler import GroupBatchSampler
from rmlab.data.tokenize import TokenizedGroup, split_group
from rmlab.data.types import Comparison

NAN = float("nan")


def make_groups(n: int = 60, seed: int = 0) -> list[TokenizedGroup]:
    """Groups with K in 2..6, all pairs labelled, response lengths 3..60 tokens (distinct ids per response)."""
    rng, out, tok = random.Random(seed), [], 10
    for g in range(n):
        k, length = rng.randint(2, 6), rng.randint(3, 60)
        resp = []
        for _ in range(k):
            resp.append(list(range(tok, tok + length)))
            tok += length
        cmps: list[Comparison] = comparisons_from_scores([rng.random() for _ in range(k)])
        out.append(
            TokenizedGroup(
                prompt_ids=[1, 2],
                response_ids=resp,
                winner=[c.winner for c in cmps],
                loser=[c.loser for c in cmps],
                margin=[NAN] * len(cmps),
                strength=[-1] * len(cmps),
                weight=[1.0] * len(cmps),
                tie=[False] * len(cmps),
                group_weight=[1 / len(cmps)] * len(cmps),
                group_id=f"g{g}",
            )
        )
    return out


def sampler(groups, **kw) -> GroupBatchSampler:
    args = dict(max_tokens=600, max_responses=16, shuffle=True, seed=3)
    return GroupBatchSampler([g.k for g in groups], [g.max_row for g in groups], **{**args, **kw})


def test_every_comparison_of_a_prompt_lands_in_one_batch():
    groups = make_groups()
    s = sampler(groups, even=False)
    seen = Counter()
    for batch_idx in s:
        b = collate([groups[i] for i in batch_idx], pad_id=0)
        # Budgets: rows and padded tokens, not a fixed count of groups.
        assert b.input_ids.shape[0] <= 16 and b.input_ids.numel() <= 600
        per_group = Counter(b.cmp_group.tolist())
        for j, i in enumerate(batch_idx):
            assert per_group[j] == len(groups[i].winner)  # all of the prompt's comparisons are here
            seen[i] += 1
    assert seen == Counter(range(len(groups)))  # each prompt exactly once per epoch


def test_length_sorting_reduces_padding():
    groups = make_groups(200)

    def pad_fraction(**kw):
        real = padded = 0
        for batch_idx in sampler(groups, even=False, **kw):
            rows = [groups[i].max_row for i in batch_idx for _ in range(groups[i].k)]
            real += sum(len(groups[i].prompt_ids) + len(r) for i in batch_idx for r in groups[i].response_ids)
            padded += len(rows) * max(rows)
        return 1 - real / padded

    assert pad_fraction(sort_by_length=True) < 0.5 * pad_fraction(sort_by_length=False)


@pytest.mark.parametrize("even", [False, True])
def test_two_ranks_get_disjoint_groups_that_cover_the_data(even):
    groups = make_groups(61)
    ranks = [list(sampler(groups, num_replicas=2, rank=r, even=even)) for r in (0, 1)]
    mine = [{i for b in batches for i in b} for batches in ranks]
    assert not mine[0] & mine[1]
    everything = set(range(len(groups)))
    n_batches = len(list(sampler(groups, even=False)))
    if even:  # training: equal steps on both ranks; at most one batch (world - 1) left out this epoch
        assert len(ranks[0]) == len(ranks[1]) == n_batches // 2
        assert len(everything - (mine[0] | mine[1])) <= 16
    else:  # evaluation: every group scored exactly once
        assert mine[0] | mine[1] == everything
        assert sum(len(b) for r in ranks for b in r) == len(groups)


def test_set_epoch_reshuffles_deterministically():
    groups = make_groups()
    s = sampler(groups)
    e0 = list(s)
    assert list(s) == e0  # same epoch, same order
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(i for b in e1 for i in b) == sorted(i for b in e0 for i in b)
    s.set_epoch(0)
    assert list(s) == e0


def test_a_group_too_big_for_a_batch_is_split_without_losing_a_comparison():
    big = make_groups(1)[0]
    k = 11
    big.response_ids = [[100 + i] * 5 for i in range(k)]
    cmps = comparisons_from_scores([float(i % 4) for i in range(k)])  # 55 comparisons, some ties
    big.winner, big.loser = [c.winner for c in cmps], [c.loser for c in cmps]
    big.margin, big.tie = [c.margin for c in cmps], [c.tie for c in cmps]
    n = len(cmps)
    big.strength, big.weight, big.group_weight = [-1] * n, [1.0] * n, [1 / n] * n
    subs = split_group(big, max_responses=4, parent=0)
    assert all(s.k <= 4 for s in subs) and all(s.parent == 0 for s in subs)

    def original(s, j):  # a sub-group's response -> its index in the big group (ids are distinct)
        return s.response_ids[j][0] - 100

    got = Counter((original(s, w), original(s, lo), t) for s in subs for w, lo, t in zip(s.winner, s.loser, s.tie))
    assert got == Counter(zip(big.winner, big.loser, big.tie))  # every comparison exactly once
    assert all(gw == 1 / n for s in subs for gw in s.group_weight)  # eq 6 still weighs the whole prompt
    with pytest.raises(ValueError, match="split it first"):
        GroupBatchSampler([k], [6], max_tokens=600, max_responses=4)
