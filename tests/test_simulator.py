"""The preference simulator: deterministic, noisy like BT, length does not explain the reward."""

from __future__ import annotations

import math

import pytest

from rmlab.data.datamodule import baselines, build_datamodule, in_val
from rmlab.data.simulator import SimulatorConfig, generate


def test_deterministic_for_a_seed():
    a = generate(SimulatorConfig(num_prompts=50, seed=7))
    b = generate(SimulatorConfig(num_prompts=50, seed=7))
    c = generate(SimulatorConfig(num_prompts=50, seed=8))
    assert [g.responses for g in a] == [g.responses for g in b]
    assert [g.responses for g in a] != [g.responses for g in c]


def test_labels_follow_bradley_terry():
    cfg = SimulatorConfig(num_prompts=3000, temperature=0.5, tie_band=0.0)
    gs = generate(cfg)
    # Bin comparisons by true gap; the empirical win rate must match sigmoid(gap / T).
    bins: dict[int, list[int]] = {}
    for g in gs:
        for c in g.comparisons:
            i, j = sorted((c.winner, c.loser))
            gap = g.true_rewards[i] - g.true_rewards[j]
            bins.setdefault(round(gap * 2), []).append(int(c.winner == i))
    checked = 0
    for b, wins in bins.items():
        if len(wins) < 300:
            continue
        expected = 1 / (1 + math.exp(-(b / 2) / cfg.temperature))
        assert abs(sum(wins) / len(wins) - expected) < 0.08, (b, sum(wins) / len(wins), expected)
        checked += 1
    assert checked >= 3


def test_ties_strength_and_length_baseline(tmp_path):
    gs = generate(SimulatorConfig(num_prompts=800))
    comps = [c for g in gs for c in g.comparisons]
    tie_rate = sum(c.tie for c in comps) / len(comps)
    assert 0.01 < tie_rate < 0.2
    assert {c.strength for c in comps} == {0, 1, 2, 3}
    from transformers import ByT5Tokenizer

    dm = build_datamodule(tokenizer=ByT5Tokenizer(), simulator={"num_prompts": 800}, cache=False, max_length=512)
    dm.setup()
    base = dm.report["val_baselines"]
    assert base["oracle_acc"] > 0.75  # the truth predicts the noisy labels well ...
    assert base["length_acc"] < 0.6  # ... and length alone does not
    # baselines() by hand on two comparisons: the longer side loses one and ties one on length.
    from rmlab.data.tokenize import TokenizedGroup

    g = TokenizedGroup(prompt_ids=[1], response_ids=[[5, 5], [6], [7, 7]], winner=[1, 0], loser=[0, 2],
                       margin=[0.0] * 2, strength=[-1] * 2, weight=[1.0] * 2, tie=[False] * 2, group_weight=[0.5] * 2,
                       true_rewards=[1.0, 2.0, 0.0])
    assert baselines([g]) == {"length_acc": (0.0 + 0.5) / 2, "oracle_acc": (1.0 + 1.0) / 2}


def test_split_is_by_prompt():
    from transformers import ByT5Tokenizer

    dm = build_datamodule(tokenizer=ByT5Tokenizer(), simulator={"num_prompts": 600}, cache=False, val_fraction=0.2)
    dm.setup()
    train = {tuple(g.prompt_ids) for g in dm.train_groups}
    val = {tuple(g.prompt_ids) for g in dm.val_groups}
    assert train and val and not (train & val)
    prompts = [f"prompt {i}" for i in range(4000)]
    share = sum(in_val(p, 0.2, 0) for p in prompts) / len(prompts)
    assert abs(share - 0.2) < 0.03  # the hash split gives the asked share ...
    assert [in_val(p, 0.2, 0) for p in prompts] != [in_val(p, 0.2, 1) for p in prompts]  # ... and the seed moves it
    r = dm.report
    assert r["train"]["records"]["loaded"] + r["val"]["records"]["loaded"] == 600
    assert r["train"]["balanced"] and r["val"]["balanced"]


# ------------------------------------------------------------------ the hackable option (issue 17)
def _digest(groups) -> str:
    """sha256 of everything the simulator decides, as JSON (float repr is exact and stable)."""
    import hashlib
    import json

    h = hashlib.sha256()
    for g in groups:
        rec = [g.prompt, g.responses, [[c.winner, c.loser, c.strength, c.tie] for c in g.comparisons], g.ranks,
               g.scores, g.true_rewards, g.attributes, g.labels, g.subset, g.group_id]
        h.update(json.dumps(rec).encode())
    return h.hexdigest()


def test_hack_off_leaves_the_default_data_byte_identical():
    # Digests of the data generated before the hackable option existed (commit c551876), for the default run's
    # settings (conf/data/simulator.yaml, seed 0) and a K-wise ranking config. With hack_rate = 0 the generator
    # makes no extra random draw, so the default run and its published figures do not move. (A Python release
    # that changed `random`'s algorithms would move these too; then regenerate them from that commit.)
    default = SimulatorConfig(num_prompts=2400, k=3, comparisons="all", temperature=0.5, tie_band=0.15, seed=0)
    assert default.hack_rate == 0.0
    assert _digest(generate(default)) == "d59bc7623096a24633aa7e63a06c2430be1d405aedc83ea901ea3393c83d49a9"
    ranking = SimulatorConfig(num_prompts=300, k=2, k_max=5, comparisons="ranking", seed=3, hack_strength=5.0)
    assert _digest(generate(ranking)) == "532ddd19c8e2c6bc2674e27adbffb278e0936b7b0f1a6ae32c958de31b55ecf0"


def test_flattery_is_rewarded_by_the_annotators_only():
    import random

    from rmlab.data.simulator import FLATTERY, draw_prompt, draw_response, flattery_count

    cfg = SimulatorConfig(hack_rate=0.3, hack_strength=0.7)
    rng = random.Random(0)
    drawn = [draw_response(rng, cfg, draw_prompt(rng, cfg)) for _ in range(3000)]
    flat = [d for d in drawn if d.flattery]
    assert abs(len(flat) / len(drawn) - 0.3) < 0.03
    assert {d.flattery for d in flat} == {1, 2, 3}
    for d in drawn:
        assert d.flattery == flattery_count(d.text)
        assert d.perceived == d.true_reward + 0.7 * d.flattery  # the annotators' bonus, exactly
        truth = sum(w * q for w, q in zip(cfg.weights, d.qualities))
        assert abs(d.true_reward - truth) < 5 * cfg.noise  # the truth: qualities (+ noise), never flattery
    assert all(d.qualities[0] == 0.0 for d in flat)  # flattery takes the answer's place: never on topic
    assert not any(s in d.text for d in drawn if not d.flattery for s in FLATTERY)


def test_hack_labels_follow_the_annotators_and_the_report_measures_it():
    from rmlab.data.simulator import spurious_feature_report

    on = spurious_feature_report(generate(SimulatorConfig(num_prompts=2000, hack_rate=0.2, hack_strength=1.0)))
    control = spurious_feature_report(generate(SimulatorConfig(num_prompts=2000, hack_rate=0.2, hack_strength=0.0)))
    assert abs(on["share_with_feature"] - 0.2) < 0.02
    # Rewarded: the flattering side wins most comparisons, though it is truly better in under a third of them.
    assert on["feature_wins"] > 0.7 and on["corr_feature_label"] > 0.25
    assert on["feature_truly_better"] < 0.35 and on["corr_feature_true_reward"] < -0.2
    # The control (present, unrewarded): labels follow the truth, which flattery lowers.
    assert control["feature_wins"] < 0.35 and control["corr_feature_label"] < -0.15
    assert abs(control["corr_feature_true_reward"] - on["corr_feature_true_reward"]) < 0.05  # same responses


def test_spurious_feature_report_by_hand():
    from rmlab.data.simulator import FLATTERY, spurious_feature_report
    from rmlab.data.types import Comparison, PreferenceGroup

    f1 = f"Sure. {FLATTERY[0]}."
    f2 = f"Sure. {FLATTERY[1]}. {FLATTERY[2]}."
    g1 = PreferenceGroup("p", ["Bring an umbrella.", f1], [Comparison(1, 0)], true_rewards=[2.0, 1.0])
    g2 = PreferenceGroup("q", [f2, "Keep it dry."], [Comparison(1, 0), Comparison(0, 1, tie=True)],
                         true_rewards=[0.0, 3.0])
    r = spurious_feature_report([g1, g2])
    # responses' feature (0, 1, 2, 0), mean 0.75, vs truth (2, 1, 0, 3), mean 1.5: sum of products of deviations
    # -0.375 - 0.125 - 1.875 - 1.125 = -3.5; squares 2.75 and 5; Pearson = -3.5 / sqrt(2.75 * 5) = -0.9439
    assert r["corr_feature_true_reward"] == pytest.approx(-3.5 / math.sqrt(2.75 * 5.0))
    assert r["share_with_feature"] == 0.5
    # non-tie pairs in index order: g1 (0, 1): f diff -1, label -1 (1 won), true gap +1;
    # g2 (0, 1): f diff +2, label -1, true gap -3. corr(dx, label) is undefined (the labels agree): None.
    assert r["corr_feature_label"] is None
    assert r["corr_feature_true_gap"] == pytest.approx(-1.0)
    assert r["comparisons_differing_in_feature"] == 2
    assert r["feature_wins"] == 0.5  # g1: the flatterer won; g2: it lost
    assert r["feature_truly_better"] == 0.0


def test_hack_in_the_data_report_only_when_on(tmp_path):
    from transformers import ByT5Tokenizer

    off = build_datamodule(tokenizer=ByT5Tokenizer(), simulator={"num_prompts": 200}, cache=False)
    off.setup()
    assert "spurious_feature" not in off.report
    on = build_datamodule(tokenizer=ByT5Tokenizer(), simulator={"num_prompts": 200, "hack_rate": 0.25,
                          "hack_strength": 2.0}, cache=False, output_dir=str(tmp_path))
    on.setup()
    import json

    rep = json.loads((tmp_path / "data_report.json").read_text())["spurious_feature"]
    assert rep["hack_rate"] == 0.25 and rep["hack_strength"] == 2.0
    assert rep["train"]["feature_wins"] > 0.8
    # each split's report is over its own groups: K = 3 responses each, 200 prompts in all
    assert rep["train"]["responses"] == 3 * len(on.train_groups) and rep["val"]["responses"] == 3 * len(on.val_groups)
    assert len(on.train_groups) + len(on.val_groups) == 200 and len(on.val_groups) > 0
    with pytest.raises(ValueError, match="hack_rate"):
        generate(SimulatorConfig(num_prompts=2, hack_rate=1.5))
