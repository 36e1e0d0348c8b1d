"""eval.py and rmlab.score for every head: generative verifier, pairwise judge and attribute head.

Each model is a tiny random-init Llama built from its config and exported; the CLI loads the export
(its config.json names the head) and its numbers are checked against a hand-computed forward.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1"]


def _build(name, tmp_path, extra=()):
    from hydra.utils import instantiate

    cfg = compose([f"model={name}", *SMALL, *extra], tmp_path)
    torch.manual_seed(0)
    return instantiate(cfg.model, _convert_="all").eval()


def _records(n=5):
    from rmlab.data.simulator import SimulatorConfig, generate

    groups = generate(SimulatorConfig(num_prompts=n, k=2, seed=3))
    pairs = [{"prompt": g.prompt, "chosen": g.responses[0], "rejected": g.responses[1], "id": i} for i, g in enumerate(groups)]
    singles = [{"prompt": g.prompt, "response": g.responses[1], "id": 100 + i} for i, g in enumerate(groups)]
    return pairs, singles


def _cli(export, recs, tmp_path, name="in.jsonl"):
    from rmlab.score import main

    src, dst = tmp_path / name, tmp_path / (name + ".out")
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    main([str(src), "--model", str(export), "-o", str(dst), "--no-progress", "--max-length", "2048"])
    return [json.loads(line) for line in dst.read_text().splitlines()]


def _row(model, text):
    """A byte-tokenizer row exactly as rmlab builds it: the text's bytes, then </s>."""
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    return ids, torch.ones_like(ids)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_score_cli_verifier_is_log_odds_of_the_templated_row(tmp_path):
    m = _build("generative_verifier", tmp_path)
    export = m.save_pretrained(tmp_path / "export")
    pairs, singles = _records()
    out = _cli(export, pairs + singles, tmp_path)
    assert [r["id"] for r in out] == [r["id"] for r in pairs + singles]  # order and fields kept
    tpl = m.group_template.template

    def hand(p, r):
        with torch.no_grad():
            return float(m(*_row(m, tpl.format(prompt=p, response=r)))[0])

    for rec in out:
        if "response" in rec:
            assert rec["reward"] == pytest.approx(hand(rec["prompt"], rec["response"]), abs=1e-5)
        else:
            rc, rr = hand(rec["prompt"], rec["chosen"]), hand(rec["prompt"], rec["rejected"])
            assert rec["reward_chosen"] == pytest.approx(rc, abs=1e-5)
            assert rec["reward_rejected"] == pytest.approx(rr, abs=1e-5)
            assert rec["p_chosen"] == pytest.approx(_sig(rc - rr), abs=1e-6)


def test_score_cli_judge_averages_both_orders_and_refuses_single_responses(tmp_path):
    m = _build("pairwise_judge", tmp_path)
    export = m.save_pretrained(tmp_path / "export")
    pairs, singles = _records()
    out = _cli(export, pairs, tmp_path)
    tpl = m.group_template.template
    for rec in out:
        with torch.no_grad():
            r1 = float(m(*_row(m, tpl.format(prompt=rec["prompt"], response_a=rec["chosen"], response_b=rec["rejected"])))[0])
            r2 = float(m(*_row(m, tpl.format(prompt=rec["prompt"], response_a=rec["rejected"], response_b=rec["chosen"])))[0])
        assert rec["judge_logit_chosen_first"] == pytest.approx(r1, abs=1e-5)
        assert rec["judge_logit_chosen_second"] == pytest.approx(r2, abs=1e-5)
        assert rec["p_chosen"] == pytest.approx((_sig(r1) + _sig(-r2)) / 2, abs=1e-6)
        assert rec["position_flip"] == ((r1 > 0) == (r2 > 0))
    with pytest.raises(SystemExit, match=r"in2.jsonl:1.*judge compares two responses"):
        _cli(export, singles, tmp_path, "in2.jsonl")


def test_score_cli_attribute_head_reports_each_attribute(tmp_path):
    w = [0.5, 0.3, 0.2]
    m = _build("attributes", tmp_path, ["model.head_options.combine=fixed", f"model.head_options.weights={w}"])
    export = m.save_pretrained(tmp_path / "export")
    pairs, singles = _records()
    out = _cli(export, singles + pairs, tmp_path)
    names = ["on_topic", "format_ok", "polite"]

    def hand(p, response):  # the attribute outputs of the row prompt + response, by the model's own forward
        ids, mask = _row(m, p + response)
        with torch.no_grad():
            a = m.heads(ids, mask, None, torch.tensor([len(m.tokenizer(p, add_special_tokens=False)["input_ids"])]))
        return a["attributes"][0].tolist()

    assert len(out) == 10
    for rec in out:
        p = rec["prompt"]
        sides = [("", rec["response"])] if "response" in rec else [("_chosen", rec["chosen"]), ("_rejected", rec["rejected"])]
        for suffix, response in sides:
            want = hand(p, response)
            assert list(rec["attributes" + suffix]) == names
            assert [rec["attributes" + suffix][n] for n in names] == pytest.approx(want, abs=1e-5)
            assert rec["reward" + suffix] == pytest.approx(sum(wi * ai for wi, ai in zip(w, want)), abs=1e-5)
        if "response" not in rec:
            assert rec["p_chosen"] == pytest.approx(_sig(rec["reward_chosen"] - rec["reward_rejected"]), abs=1e-6)


def test_score_gated_attribute_export_equals_the_trained_model(tmp_path):
    from rmlab.score import Scorer

    m = _build("attributes", tmp_path)  # combine=gating: the gate reads the prompt
    export = m.save_pretrained(tmp_path / "export")
    pairs, singles = _records()
    items = [(r["prompt"], [r["response"]]) for r in singles]
    mine = [r[0] for r in Scorer(m, max_length=2048).score(items)]
    assert [r["reward"] for r in _cli(export, singles, tmp_path)] == pytest.approx(mine, abs=1e-5)


@pytest.mark.parametrize(
    "name,head_key",
    [("generative_verifier", None), ("pairwise_judge", "head/position_bias_rate"), ("attributes", "head/attr_corr/on_topic")],
)
def test_eval_report_for_each_head_from_its_export(name, head_key, tmp_path):
    from rmlab.evaluate import run

    export = _build(name, tmp_path).save_pretrained(tmp_path / "export")
    cfg = compose(
        [f"model.name_or_path={export}", "data.simulator.num_prompts=24", "data.cache=false", "split=all"],
        tmp_path / "ev",
        "eval",
    )
    res = run(cfg)
    blob = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    acc, n = blob["metrics"]["acc"], blob["metrics"]["n_comparisons"]
    from rmlab.data.simulator import SimulatorConfig, generate

    groups = generate(SimulatorConfig(num_prompts=24, seed=0))  # the eval's data: the simulator at seed 0
    assert n == sum(not c.tie for g in groups for c in g.comparisons)  # every labelled non-tie comparison
    if name != "pairwise_judge":  # a reward per response: the share of comparisons the export's rmlab.score wins
        from rmlab.models import load_export
        from rmlab.score import Scorer

        scored, attrs = Scorer(load_export(str(export)).eval(), max_length=256).rows([(g.prompt, g.responses) for g in groups])
        right = [float(rs[c.winner] > rs[c.loser]) for g, rs in zip(groups, scored) for c in g.comparisons if not c.tie]
        assert acc == pytest.approx(sum(right) / len(right), abs=1e-9)
    if name == "attributes":  # Pearson of the on_topic output with the simulator's on_topic rating, over the 72 responses
        import numpy as np

        out = np.array([a[0] for g in attrs for a in g])
        truth = np.array([a[0] for g in groups for a in g.attributes])
        assert len(out) == 72 and res["metrics"][head_key] == pytest.approx(float(np.corrcoef(out, truth)[0, 1]), abs=1e-5)
    # A share of n comparisons (a judge's order-averaged tie scores 1/2): a multiple of 1/(2n).
    assert 2 * acc * n == pytest.approx(round(2 * acc * n), abs=1e-6)
    assert {"reliability.png", "reward_hist.png", "length_bias.png"} <= {p.name for p in (tmp_path / "ev").glob("*.png")}
    if head_key:
        v = res["metrics"][head_key]
        assert isinstance(v, float) and math.isfinite(v) and 0.0 <= abs(v) <= 1.0
        assert head_key in (tmp_path / "ev" / "report.md").read_text()
    if name == "pairwise_judge":  # the shared accuracy is the order-averaged verdict
        h = res["metrics"]
        k = h["head/comparisons"]
        # position bias = P(sign r1 == sign r2) = P(both > 0) + P(both <= 0) >= |P(r1 > 0) - P(r2 <= 0)|, a
        # share of the comparisons; a flip rate or a per-order accuracy in its place fails one of these.
        assert h["head/position_bias_rate"] * k == pytest.approx(round(h["head/position_bias_rate"] * k), abs=1e-6)
        assert h["head/position_bias_rate"] >= abs(h["head/acc_chosen_first"] - h["head/acc_chosen_second"]) - 1e-9
        assert res["metrics"]["acc"] == pytest.approx(res["metrics"]["head/acc"], abs=1e-6)
