"""rmlab.metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmlab.metrics import (
    PredictionCollector,
    Predictions,
    accuracy_by,
    calibration,
    calibration_bins,
    compute_all,
    expected_calibration_error,
    group_rank_correlation,
    kendall_tau_b,
    quantile_buckets,
    section_scores,
    spearman_rho,
    strict_accuracy,
)


def logit(p):
    return math.log(p / (1 - p))


def test_ece_and_brier_on_a_toy_case():
    # p = sigmoid(r_w - r_l) = 0.9, 0.9, 0.6, 0.3; symmetrized points (p, 1) and (1 - p, 0).
    # bin [0.5, 1]: p = .9 .9 .6 .7 with y = 1 1 1 0 -> conf .775, acc .75, |diff| .025, n 4
    # bin [0, 0.5): p = .3 .1 .1 .4 with y = 1 0 0 0 -> conf .225, acc .25, |diff| .025, n 4
    # ECE = 4/8 * .025 + 4/8 * .025 = .025; Brier = (.01 + .01 + .16 + .49) / 4 = .1675
    gap = np.array([logit(0.9), logit(0.9), logit(0.6), logit(0.3)])
    cal = calibration(gap, n_bins=2)
    assert cal["ece"] == pytest.approx(0.025, abs=1e-9)
    assert cal["brier"] == pytest.approx(0.1675, abs=1e-9)
    assert [b["count"] for b in cal["bins"]] == [4, 4]
    assert cal["bins"][1]["confidence"] == pytest.approx(0.775) and cal["bins"][1]["accuracy"] == pytest.approx(0.75)


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    # 10 comparisons at p = 0.7 with 7 won and 3 lost: perfectly calibrated -> ECE 0.
    # Losing a comparison here means the labelled winner got the lower reward: gap -logit(.7).
    gap = np.array([logit(0.7)] * 7 + [-logit(0.7)] * 3)
    assert calibration(gap, n_bins=10)["ece"] == pytest.approx(0.0, abs=1e-9)
    # Always p = .99 but right only half the time: ECE = |.99 - .5| = .49.
    gap = np.array([logit(0.99)] * 5 + [-logit(0.99)] * 5)
    assert calibration(gap, n_bins=10)["ece"] == pytest.approx(0.49, abs=1e-9)


def test_ece_is_zero_for_a_calibrated_set_on_a_bin_edge():
    # 100 comparisons at p = 0.8 (an edge of the 10 bins), 80 won: perfectly calibrated. The points
    # (0.8, 1) x 80, (0.2, 1) x 20 and their mirrors (0.2, 0) x 80, (0.8, 0) x 20 must share two bins.
    for gap in (
        np.array([logit(0.8)] * 80 + [-logit(0.8)] * 20),
        np.array([math.log(4.0)] * 80 + [-math.log(4.0)] * 20),
    ):
        cal = calibration(gap, n_bins=10)
        assert cal["ece"] == pytest.approx(0.0, abs=1e-9)
        assert [b["count"] for b in cal["bins"]] == [0, 0, 100, 0, 0, 0, 0, 100, 0, 0]
    # The same on every edge of 5 and 10 bins, and at 0 and 1.
    for n in (5, 10):
        for i in range(0, n + 1):
            p = i / n
            probs = np.array([p] * 4 + [1 - p] * 4)
            ys = np.array([1, 1, 1, 0, 0, 0, 0, 1], float) if p != 0.5 else np.array([1, 0] * 4, float)
            ece, bins = expected_calibration_error(probs, ys, n)
            counts = [b["count"] for b in bins]
            if p == 0.5:  # its own mirror: all 8 points in bin n // 2 ([0.4, 0.6) of 5, [0.5, 0.6) of 10)
                assert counts == [8 if b == n // 2 else 0 for b in range(n)], (n, counts)
                assert ece == pytest.approx(0.0, abs=1e-12)  # confidence 1/2, half of them right
            else:
                assert counts == counts[::-1] and sum(counts) == 8, (n, p, counts)
                if 8 in counts:  # 0.4 and 0.6 share 5 bins' middle one, (0.4, 0.6): confidence 1/2, 4 of 8 right
                    assert (n, p) in ((5, 0.4), (5, 0.6)) and ece == pytest.approx(0.0, abs=1e-12)
                else:  # p's bin: confidence p, 3 of 4 right; 1 - p's bin: 1 - p, 1 of 4 right: both off by |p - 3/4|
                    assert ece == pytest.approx(abs(p - 0.75), abs=1e-12), (n, p)


def _both_ways(p, y, n):
    """ECE as ``calibration`` defines it: every point (p, y) also counted as (1 - p, 1 - y)."""
    return expected_calibration_error(np.concatenate([p, 1 - p]), np.concatenate([y, 1 - y]), n)


def test_calibration_bins_mirror_and_ece_is_orientation_free():
    """Property: p and 1 - p land in bins b and n - 1 - b (edges included), so the both-orientations ECE
    of points (p, y) is the same when any of them is given the other way round, (1 - p, 1 - y), although
    1 - (1 - p) != p in floating point; and ``calibration(gap)`` is that ECE of (sigmoid(gap), 1)."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10, 15):
        edges = np.arange(n + 1) / n
        p = np.concatenate([rng.uniform(size=200), edges, 1 - edges, np.round(rng.uniform(size=50), 1)])
        y = (rng.uniform(size=p.size) < 0.7).astype(float)
        b, mirror = calibration_bins(p, n), calibration_bins(1 - p, n)
        half = p == 0.5  # 1/2 is its own mirror: one bin, n // 2
        assert np.array_equal(b[~half], n - 1 - mirror[~half]) and (b[half] == n // 2).all()
        ece, bins = _both_ways(p, y, n)
        for flip in (np.ones(p.size, bool), rng.uniform(size=p.size) < 0.5):
            q, z = np.where(flip, 1 - p, p), np.where(flip, 1 - y, y)
            ece2, bins2 = _both_ways(q, z, n)
            assert ece2 == pytest.approx(ece, abs=1e-12)
            assert [x["count"] for x in bins2] == [x["count"] for x in bins]
        # calibration(gap): the comparisons as (sigmoid(gap), 1), or the other way round (sigmoid(-gap), 0).
        gap = np.concatenate([rng.normal(size=100) * 2, [logit(e) for e in edges[1:-1]]])
        ps = 1 / (1 + np.exp(-gap))
        want = _both_ways(ps, np.ones_like(ps), n)[0]
        assert calibration(gap, n)["ece"] == pytest.approx(want, abs=1e-12)
        assert _both_ways(1 / (1 + np.exp(gap)), np.zeros_like(ps), n)[0] == pytest.approx(want, abs=1e-12)


def test_strict_accuracy_keeps_ties_apart():
    # comparisons: (2 > 1) right, (1 < 2) wrong, (1 == 1) a predicted tie = wrong, and one labelled tie.
    rw = np.array([2.0, 1.0, 1.0, 0.5])
    rl = np.array([1.0, 2.0, 1.0, 0.5])
    tie = np.array([False, False, False, True])
    s = strict_accuracy(rw, rl, tie)
    assert s["acc"] == pytest.approx(1 / 3)  # the labelled tie is not in the denominator; r_w == r_l is wrong
    assert s["tie_rate"] == pytest.approx(1 / 4)
    assert s["pred_tie_rate"] == pytest.approx(1 / 3)
    assert (s["n_comparisons"], s["n_ties"]) == (3, 1)
    assert math.isnan(strict_accuracy(rw[3:], rl[3:], tie[3:])["acc"])  # only ties: no accuracy, not 0 or 1


def test_section_weighting_by_example_count():
    by = {"a": (1.0, 10), "b": (0.5, 30), "c": (0.0, 5)}
    sec = section_scores(by, {"chat": ["a", "b"], "safety": ["c"], "empty": ["zzz"]})
    # chat = (1.0 * 10 + 0.5 * 30) / 40 = 0.625 (a plain mean of subsets would say 0.75)
    assert sec["chat"] == pytest.approx(0.625)
    assert sec["safety"] == 0.0
    assert "empty" not in sec  # a section with no examples is not a zero
    assert sec["score"] == pytest.approx((0.625 + 0.0) / 2)
    assert section_scores(by)["score"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # no sections: one per subset


def test_kendall_tau_and_spearman_by_hand():
    # y swaps the middle pair: 5 concordant, 1 discordant of 6 pairs -> tau = 4/6.
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    # rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    assert spearman_rho([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # tau-b with a tie in x: 5 concordant, the tied pair counts in neither; 5 / sqrt(5 * 6)
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, 9), rng.normal(size=9)
    assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)


def test_group_rank_correlation_skips_small_and_constant_target_groups_and_zeroes_constant_scores():
    score = np.array([1, 2, 3, 4, 0.0, 1.0, 5, 5, 5, 9, 8, 7])
    target = np.array([1, 3, 2, 4, 1.0, 0.0, 1, 2, 3, 1, 1, 1])
    group = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    g = group_rank_correlation(score, target, group)
    # group 0: tau 2/3, rho .8; group 1 has K = 2 (skipped); group 2: constant score -> counted as
    # tau = rho = 0 (it used to be skipped, which averaged over the groups the model does rank);
    # group 3: constant target, no ranking -> skipped
    assert g["n_groups"] == 2
    assert g["kendall_tau"] == pytest.approx(1 / 3) and g["spearman_rho"] == pytest.approx(0.4)


def test_group_rank_correlation_a_constant_model_is_not_absent():
    # Three groups ranked 3 > 2 > 1; the model ranks the first one right and scores the other two flat.
    score = np.array([3.0, 2.0, 1.0, 7.0, 7.0, 7.0, 0.0, 0.0, 0.0])
    target = np.array([3.0, 2.0, 1.0] * 3)
    group = np.repeat([0, 1, 2], 3)
    g = group_rank_correlation(score, target, group)
    assert g == {"kendall_tau": pytest.approx(1 / 3), "spearman_rho": pytest.approx(1 / 3), "n_groups": 3.0}
    flat = group_rank_correlation(np.zeros(9), target, group)
    assert flat == {"kendall_tau": 0.0, "spearman_rho": 0.0, "n_groups": 3.0}


def test_buckets_and_accuracy_by():
    labels, edges = quantile_buckets(np.array([0.1, 0.2, 0.3, 0.4, np.nan]), n=2)
    assert labels.tolist() == ["q1", "q1", "q2", "q2", ""] and edges == pytest.approx([0.1, 0.25, 0.4])
    assert accuracy_by(np.array([1, 0, 1, 1]), np.array(["x", "x", "y", "y"])) == {"x": (0.5, 2), "y": (1.0, 2)}


def _toy() -> Predictions:
    # Two groups. g0: 3 responses, lengths 10/20/30, true rewards 3/2/1, ranks 0/1/2.
    # g1: 2 responses (lengths 5, 50), one labelled tie.
    return Predictions(
        reward=np.array([3.0, 1.0, 2.0, 0.0, 1.0]),
        group=np.array([0, 0, 0, 1, 1]),
        response_len=np.array([10, 20, 30, 5, 50]),
        true_reward=np.array([3.0, 2.0, 1.0, 0.0, 0.5]),
        rank=np.array([0.0, 1.0, 2.0, np.nan, np.nan]),
        winner=np.array([0, 0, 1, 4]),
        loser=np.array([1, 2, 2, 3]),
        tie=np.array([False, False, False, True]),
        margin=np.full(4, np.nan),
        strength=np.array([3, 1, 0, -1]),
        subset=np.array(["chat", "chat", "safety", "safety"], dtype=object),
        group_ids=["g0", "g1"],
    )


def test_compute_all_on_a_toy_set():
    s = compute_all(_toy(), sections={"all": ["chat", "safety"]}).scalars
    # non-tie comparisons: 0>1 (3>1 right), 0>2 (3>2 right), 1>2 (1<2 wrong)
    assert s["acc"] == pytest.approx(2 / 3) and s["tie_rate"] == pytest.approx(1 / 4)
    assert s["subset/chat"] == 1.0 and s["subset/safety"] == 0.0
    assert s["section/all"] == pytest.approx(2 / 3)  # (1.0 * 2 + 0.0 * 1) / 3
    assert (s["bucket_strength/3"], s["bucket_strength/1"], s["bucket_strength/0"]) == (1.0, 1.0, 0.0)
    # chosen longer: 1 vs 2 (20 < 30 no), 0 vs 1 (10 < 20 no), 0 vs 2 (no): every winner is shorter
    assert s["length/chosen_longer_rate"] == 0.0 and s["length/acc_chosen_shorter"] == pytest.approx(2 / 3)
    # within g0, rewards 3,1,2 vs -rank 0,-1,-2: pairs (0,1) c, (0,2) c, (1,2) d -> tau 1/3
    assert s["rank/kendall_tau"] == pytest.approx(1 / 3) and s["rank/n_groups"] == 1
    # truth: model order agrees with the true reward on 0>1, 0>2, not on 1 vs 2 nor on 4 vs 3 (1 > 0 both ways: agrees)
    assert s["truth/acc"] == pytest.approx(3 / 4)
    assert s["truth/oracle_acc"] == 1.0  # the true reward orders all three non-tie labels correctly


def test_chosen_and_rejected_reward_stats():
    s = compute_all(_toy()).scalars
    # non-tie comparisons 0>1, 0>2, 1>2 over rewards 3, 1, 2 (the tie 4~3 is left out):
    # chosen r_w = 3, 3, 1 -> mean 7/3, std sqrt(((2/3)^2 * 2 + (4/3)^2) / 3) = sqrt(8/9)
    # rejected r_l = 1, 2, 2 -> mean 5/3, std sqrt(((2/3)^2 + (1/3)^2 * 2) / 3) = sqrt(2/9)
    assert s["reward/chosen_mean"] == pytest.approx(7 / 3)
    assert s["reward/chosen_std"] == pytest.approx(math.sqrt(8 / 9))
    assert s["reward/rejected_mean"] == pytest.approx(5 / 3)
    assert s["reward/rejected_std"] == pytest.approx(math.sqrt(2 / 9))
    assert s["reward/chosen_mean"] - s["reward/rejected_mean"] == pytest.approx(s["reward_gap"])


def test_compute_all_without_truth_or_strength_uses_confidence_buckets():
    p = _toy()
    p.true_reward[:] = np.nan
    p.strength[:] = -1
    r = compute_all(p)
    assert not any(k.startswith("truth/") for k in r.scalars)
    assert r.tables["buckets"]["kind"] == "confidence"
    assert sum(n for _, n in r.tables["buckets"]["acc"].values()) == 3


def test_collector_makes_indices_global():
    import torch

    from rmlab.data.collate import collate
    from rmlab.data.tokenize import TokenizedGroup

    g = TokenizedGroup(
        prompt_ids=[5, 6],
        response_ids=[[7, 1], [8, 9, 1]],
        winner=[1],
        loser=[0],
        margin=[float("nan")],
        strength=[2],
        weight=[1.0],
        tie=[False],
        group_weight=[1.0],
        group_id="a",
        subset="s",
    )
    col = PredictionCollector(keep_tokens=True)
    col.add(torch.tensor([0.0, 1.0, 2.0, 1.5]), collate([g, g], 0))
    col.add(torch.tensor([4.0, 3.0]), collate([g], 0))
    p = col.result()
    assert p.winner.tolist() == [1, 3, 5] and p.loser.tolist() == [0, 2, 4]
    assert p.group.tolist() == [0, 0, 1, 1, 2, 2] and len(p.group_ids) == 3
    assert (p.rw > p.rl).tolist() == [True, False, False]  # 1 > 0, 1.5 < 2, 3 < 4
    assert p.tokens[1] == ([5, 6], [8, 9, 1])  # prompt and response split back apart, padding removed
    with pytest.raises(ValueError, match="rewards for a batch"):
        col.add(torch.zeros(3), collate([g], 0))
