"""Grouped-prompt batching: whole prompts per batch, budgets, length buckets, rank sharding, epochs, splits."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("n_groups", [61, 60, 7])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("even", [False, True])
def test_ranks_get_disjoint_groups_that_cover_the_data(even, world, n_groups):
    groups = make_groups(n_groups)
    everything = set(range(len(groups)))
    for epoch in (0, 1, 2):
        ranks = []
        for r in range(world):
            s = sampler(groups, num_replicas=world, rank=r, even=even)
            s.set_epoch(epoch)
            ranks.append(list(s))
            assert len(s) == len(ranks[-1])
        mine = [{i for b in batches for i in b} for batches in ranks]
        assert all(not mine[a] & mine[b] for a in range(world) for b in range(a + 1, world))  # disjoint
        assert set().union(*mine) == everything  # together they cover the data: nothing left out
        assert sum(len(b) for r in ranks for b in r) == len(groups)  # and nothing repeated
        if even:  # training: equal steps on every rank
            assert len({len(r) for r in ranks}) == 1
            # The batch count was made to divide by splitting batches of several groups, one extra batch per split.
            s.set_epoch(epoch)
            n_before = len(s._all_batches())
            assert s.coverage() == {"split": len(ranks[0]) * world - n_before, "left_out": 0, "repeated": 0}
            assert 0 <= len(ranks[0]) * world - n_before < world
        for batches in ranks:  # every batch, split or not, keeps the budgets
            for b in batches:
                assert (
                    sum(groups[i].k for i in b) <= 16
                    and sum(groups[i].k for i in b) * max(groups[i].max_row for i in b) <= 600
                )


def test_uneven_batch_count_is_evened_by_splitting_the_largest_multi_group_batch():
    # 5 groups of 4 rows x 10 tokens, at most 2 groups a batch -> [2, 2, 1] groups: 3 batches for 2 ranks.
    s = GroupBatchSampler(
        [4] * 5,
        [10] * 5,
        max_tokens=10**6,
        max_responses=10**6,
        max_groups=2,
        shuffle=False,
        sort_by_length=False,
        num_replicas=2,
        even=True,
    )
    assert s._all_batches() == [[0, 1], [2, 3], [4]]
    assert s._even_batches()[0] == [[0], [1], [2, 3], [4]]  # the first of the two largest is split
    assert s.coverage() == {"split": 1, "left_out": 0, "repeated": 0}
    s.rank = 1
    assert list(s) == [[1], [4]]
    s.rank = 0
    assert list(s) == [[0], [2, 3]]


def test_when_splitting_cannot_even_the_ranks_the_left_out_groups_are_counted(caplog):
    # Every group fills a batch alone and there are 5 of them: 2 ranks cannot share 5 batches without cutting a
    # group, so one group is left out per epoch: counted by coverage() and warned about, never silent.
    kw = dict(rows=[4] * 5, row_len=[10] * 5, max_tokens=40, max_responses=4, num_replicas=2, seed=1)
    ranks = [GroupBatchSampler(**kw, rank=r) for r in (0, 1)]
    with caplog.at_level("WARNING", logger="rmlab.data.sampler"):
        got = [list(s) for s in ranks]
    assert len(got[0]) == len(got[1]) == 2
    seen = [i for r in got for b in r for i in b]
    assert len(seen) == len(set(seen)) == 4  # disjoint, and exactly one group left out
    assert ranks[0].coverage() == {"split": 0, "left_out": 1, "repeated": 0}
    assert "1 group(s) left out" in caplog.text
    # Fewer groups than ranks (a toy set): repeated rather than a rank left without a step, and counted.
    toy = [GroupBatchSampler(**{**kw, "rows": [4], "row_len": [10]}, rank=r) for r in (0, 1)]
    assert [list(s) for s in toy] == [[[0]], [[0]]] and toy[0].coverage()["repeated"] == 1


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


def test_the_data_report_counts_groups_the_ranks_cannot_share(tmp_path):
    from types import SimpleNamespace

    from rmlab.data.datamodule import build_datamodule
    from rmlab.models import build_tokenizer

    dm = build_datamodule(
        tokenizer=build_tokenizer("byt5", None),
        simulator={"num_prompts": 40},
        max_length=64,
        max_groups=1,
        cache=False,
        output_dir=str(tmp_path),
    )
    dm.setup("fit")
    dm.train_groups = dm.train_groups[:9]  # one group a batch, 9 batches: 2 ranks cannot share them evenly
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, accumulate_grad_batches=1, is_global_zero=True)
    assert len(dm.train_dataloader().batch_sampler) == 4
    want = {"ranks": 2, "epoch": 0, "batches_split": 0, "groups_left_out": 1, "groups_repeated": 0}
    assert dm.report["train"]["sharding"] == want
    assert json.loads((tmp_path / "data_report.json").read_text())["train"]["sharding"] == want
    dm.batches.max_groups = 2  # batches of two groups: splitting one evens the count, nothing is left out
    dm.train_dataloader()
    assert (
        dm.report["train"]["sharding"]["groups_left_out"] == 0 and dm.report["train"]["sharding"]["batches_split"] == 1
    )
