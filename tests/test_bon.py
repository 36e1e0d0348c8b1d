"""Best-of-n (rmlab.bon): the exact subset estimator, KL_bon, the curve numbers, and the command end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from rmlab.bon import bon_expectation, bon_weights, curve_summary, gao_fit, kl_bon, n_grid
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(scores: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """The mean over every n-subset of the value of its best-scored member, ties split evenly."""
    total, count = np.zeros(values.shape[1]), 0
    for sub in itertools.combinations(range(len(scores)), n):
        best = max(scores[i] for i in sub)
        tied = [i for i in sub if scores[i] == best]
        total += values[tied].mean(0)
        count += 1
    return total / count


def test_weights_by_hand():
    # N = 4, n = 2: position i (ascending) is the best of a pair with probability C(i, 1) / C(4, 2) = i / 6.
    assert bon_weights(4, 2) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    assert bon_weights(4, 1) == pytest.approx([0.25] * 4)  # n = 1: a uniform draw
    assert bon_weights(4, 4) == pytest.approx([0, 0, 0, 1])  # n = N: always the top
    assert bon_weights(256, 17).sum() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="n must be in"):
        bon_weights(4, 5)


def test_expectation_equals_every_subset_enumerated_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, 9).astype(float)  # many ties on purpose
    values = rng.normal(size=(9, 2))
    ns = list(range(1, 10))
    got = bon_expectation(scores, values, ns)
    for j, n in enumerate(ns):
        assert got[j] == pytest.approx(brute_force(scores, values, n), abs=1e-12)


def test_expectation_is_unbiased_for_fresh_samples():
    # One pool's exact subset mean, averaged over pools, is best-of-n on fresh samples: checked against the
    # closed form for uniform draws, where the score is the value and E[max of n U(0,1)] = n / (n + 1).
    rng = np.random.default_rng(1)
    est = np.mean([bon_expectation(u, u, [1, 4, 16]) for u in rng.random((400, 32))], 0)[:, 0]
    assert est == pytest.approx([1 / 2, 4 / 5, 16 / 17], abs=0.01)


def test_kl_and_grid():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bon(256) == pytest.approx(math.log(256) - 255 / 256)
    g = n_grid(256)
    assert g[0] == 1 and g[-1] == 256 and g == sorted(set(g)) and len(g) >= 15
    assert all(b / a <= 2.01 for a, b in zip(g, g[1:]))  # log-spaced, no gap wider than a factor of 2
    assert n_grid(1) == [1]


def test_gao_fit_recovers_the_form():
    kl = kl_bon(n_grid(256))
    d = np.sqrt(kl)
    alpha, beta = gao_fit(kl, d * (1.3 - 0.4 * d))
    assert (alpha, beta) == pytest.approx((1.3, 0.4))


def test_curve_summary_by_hand():
    ns = [1, 2, 4]
    per = np.zeros((2, 3, 4))
    per[:, :, 0] = [[1.0, 3.0, 2.0], [1.0, 2.0, 1.0]]  # true: mean curve 1, 2.5, 1.5 -> peak at n = 2
    per[:, :, 1] = [[0.0, 1.0, 2.0], [0.0, 1.0, 3.0]]  # proxy keeps rising
    s = curve_summary(ns, per)
    assert s["peak_true_reward"] == 2.5 and s["n_at_peak"] == 2 and s["kl_at_peak"] == pytest.approx(kl_bon(2))
    assert s["true_at_1"] == 1.0 and s["true_at_max_n"] == 1.5
    assert s["drop_peak_to_max_n"] == 1.0
    assert s["drop_se"] == pytest.approx(0.0)  # both prompts drop by exactly 1
    assert s["proxy_at_max_n"] == 2.5
    # the largest fall: from n = 2 to n = 4, 1 and 1 per prompt
    assert (s["max_drawdown"], s["drawdown_from_n"], s["drawdown_to_n"]) == (1.0, 2, 4)
    per[:, :, 0] = [[1.0, 2.0, 3.0], [1.0, 2.0, 5.0]]  # still rising at the end: the peak is the last n, no fall
    s = curve_summary(ns, per)
    assert s["n_at_peak"] == 4 and s["drop_peak_to_max_n"] == 0.0 and s["max_drawdown"] == 0.0


def test_drawdown_sees_a_fall_the_curve_climbs_back_from():
    from rmlab.bon import drawdown

    # peak 2.0 at index 1, falls to 1.2 at index 3, ends at 2.5 (the global peak): the drop from the global
    # peak to the end is 0, the largest fall is 2.0 - 1.2 = 0.8
    assert drawdown(np.array([1.0, 2.0, 1.5, 1.2, 2.5])) == (1, 3)
    assert drawdown(np.array([3.0, 2.0, 4.0, 1.0])) == (2, 3)  # 4 -> 1 beats 3 -> 2
    assert drawdown(np.array([1.0, 2.0, 3.0])) == (0, 0)  # never falls


@pytest.mark.slow
def test_bon_on_a_trained_hackable_model(tmp_path, capsys):
    """Train a tiny model on the hackable simulator, run the command on its export, check what it wrote."""
    from rmlab.bon import main
    from rmlab.data.datamodule import in_val
    from rmlab.train import run

    cfg = compose(["debug=fast", "export=true", "threads=1", "data.simulator.hack_rate=0.3", "~callbacks.progress_bar"],
                  tmp_path / "run")
    run(cfg)
    out = tmp_path / "bon"
    main(["--model", str(tmp_path / "run" / "export"), "--prompts", "4", "--pool", "32", "--out", str(out),
          "--no-progress"])
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "bon.png").stat().st_size > 10_000 and (out / "curves.csv").is_file()
    info = m["info"]
    assert info["held_out_by"] == {"val_fraction": cfg.data.val_fraction, "data_seed": cfg.seed}
    assert info["simulator"]["hack_rate"] == 0.3
    (curve,) = m["curves"]
    assert curve["n"][0] == 1 and curve["n"][-1] == 32
    oracle = m["oracle"]
    # n = 1 is a uniform draw: the same expected true reward whatever picks; picking by the truth is the ceiling.
    assert curve["true"][0] == pytest.approx(oracle["true"][0])
    assert all(o >= t - 1e-9 for o, t in zip(oracle["true"], curve["true"]))
    assert all(b >= a - 1e-9 for a, b in zip(curve["proxy"], curve["proxy"][1:]))  # max of more: never lower
    s = m["summary"][curve["name"]]
    assert s["peak_true_reward"] == max(curve["true"]) and s["n_at_peak"] in curve["n"]
    assert s["drop_peak_to_max_n"] == pytest.approx(s["peak_true_reward"] - curve["true"][-1])
    assert "peak true" in capsys.readouterr().out
    # held out: the pools' prompts were the run's val prompts (same seed, same pools when rerun)
    from rmlab.bon import draw_pools, simulator_settings

    sim, frac, seed, known = simulator_settings(cfg, None)
    pools = draw_pools(sim, 4, 8, 0, lambda t: in_val(t, frac, seed))
    assert known and all(in_val(p["prompt"], frac, seed) for p in pools)
    # --summarize: one arm, its numbers in the table
    main(["--summarize", str(out), "--out", str(tmp_path / "sum")])
    assert (tmp_path / "sum" / "bon_summary.png").is_file()
    assert curve["arm"] in (tmp_path / "sum" / "bon_summary.md").read_text()
    # arms drawn with another --pool run over another n grid: a clear error naming both, not numpy's traceback
    # the same export twice (one recipe, one seed): each member keeps its own curve and row beside the ensemble
    export = str(tmp_path / "run" / "export")
    main(["--model", export, "--model", export, "--combine", "mean", "--prompts", "2", "--pool", "16",
          "--out", str(tmp_path / "b16"), "--no-progress"])
    m2 = json.loads((tmp_path / "b16" / "metrics.json").read_text())
    names = [c["name"] for c in m2["curves"]]
    assert len(set(names)) == 3 and list(m2["summary"]) == names and names[1] == f"{names[0]} #2"
    assert m2["summary"][names[0]] == m2["summary"][names[1]]  # the same model: the same curve
    assert f"| {names[1]} |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"different pools .*--pool 32.*--pool 16.*same --pool"):
        main(["--summarize", str(out), str(tmp_path / "b16"), "--out", str(tmp_path / "sum2")])


def test_arguments_fail_before_anything_loads(capsys):
    from rmlab.bon import main

    with pytest.raises(SystemExit):
        main([])
    assert "give a model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "x", "--combine", "max"])
    assert "--combine" in capsys.readouterr().err


def test_summarize_says_where_it_wrote(tmp_path, monkeypatch, capsys):
    """`--summarize` without --out wrote outputs/bon/summary/ and printed only the table: the user had to guess
    where the chart went. It now names both files (the curve is hand-made: 4 n, one arm)."""
    from rmlab.bon import main

    n, kl = [1, 2, 4, 8], [0.0, 0.19, 0.64, 1.2]
    values = {v: [1.0, 1.5, 1.7, 1.6] for v in ("true", "proxy", "annotator", "flattery")}
    summary = {"true_at_1": 1.0, "peak_true_reward": 1.7, "n_at_peak": 4, "true_at_max_n": 1.6,
               "drop_peak_to_max_n": 0.1, "max_drawdown": 0.1, "drawdown_from_n": 4, "drawdown_to_n": 8}
    curve = {"name": "bt seed 0", "arm": "bt", "seed": 0, "kind": "member", "n": n, "kl": kl, **values,
             **{f"{v}_se": [0.0] * 4 for v in values}, "summary": summary}
    run = tmp_path / "bt"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"info": {"prompts": 2, "pool": 8}, "curves": [curve],
                                                  "summary": {"bt seed 0": summary}, "oracle": None}))
    monkeypatch.chdir(tmp_path)
    main(["--summarize", str(run)])
    err = capsys.readouterr().err
    out = tmp_path / "outputs" / "bon" / "summary"
    assert (out / "bon_summary.md").is_file() and (out / "bon_summary.png").is_file()
    assert "wrote outputs/bon/summary/bon_summary.md, outputs/bon/summary/bon_summary.png" in err
