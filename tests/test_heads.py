"""Multi-attribute heads (ArmoRM): shapes, fixed and gated combination, the two-stage loss, export, and
recovery of the simulator's true qualities."""

from __future__ import annotations

import math

import pytest
import torch

from rmlab.data.collate import collate
from rmlab.data.simulator import ATTRIBUTES, SimulatorConfig, generate
from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import DataReport
from rmlab.losses.base import Comparisons
from rmlab.losses.heads import AttributeLoss, head_default_loss
from rmlab.metrics import pearson
from rmlab.models import build_model
from rmlab.models.attributes import AttributeRewardModel, attribute_options
from tests.conftest import TINY_LLAMA, compose

NAMES = list(ATTRIBUTES)


def _model(combine="gating", weights=None, seed=0):
    torch.manual_seed(seed)
    opts = {"attributes": NAMES, "combine": combine, "weights": weights, "gating_hidden": 16}
    return build_model(config=TINY_LLAMA, tokenizer="byt5", head="attributes", head_options=opts).eval()


def _batch(model, n=4, side="right", seed=3):
    toks = tokenize_groups(
        generate(SimulatorConfig(num_prompts=n, k=3, seed=seed)), model.tokenizer, DataReport(), 512, 8
    )
    return collate(toks, model.tokenizer.pad_token_id, side)


def test_fixed_weights_combine_the_attribute_outputs():
    m = _model("fixed", [1.0, 2.0, -0.5])
    assert isinstance(m, AttributeRewardModel) and m.hf.config.num_labels == 3
    b = _batch(m)
    with torch.no_grad():
        r, heads = m.score_heads(b)
    a = heads["attributes"]
    assert a.shape == (b.input_ids.shape[0], 3) and r.shape == (b.input_ids.shape[0],)
    torch.testing.assert_close(r, a @ torch.tensor([1.0, 2.0, -0.5]))
    with torch.no_grad():  # the plain forward (no prompt_len needed with fixed weights) gives the same
        torch.testing.assert_close(m(b.input_ids, b.attention_mask), r)


def test_gate_reads_only_the_prompt():
    m = _model("gating")
    b = _batch(m, n=5)
    with torch.no_grad():
        _, h = m.score_heads(b)
        _, h_left = m.score_heads(_batch(m, n=5, side="left"))
    w = h["weights"]
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
    assert (w > 0).all()
    gi = b.group_index
    for g in gi.unique():  # one prompt, one set of weights, whatever the response
        torch.testing.assert_close(w[gi == g], w[gi == g][:1].expand_as(w[gi == g]), atol=1e-6, rtol=0)
    assert (w[gi == 0][0] - w[gi == 1][0]).abs().max() > 1e-5  # different prompts, different weights
    torch.testing.assert_close(h_left["weights"], w, atol=1e-5, rtol=0)  # padding side changes nothing
    torch.testing.assert_close(h_left["attributes"], h["attributes"], atol=1e-5, rtol=0)
    b.prompt_len = None
    with pytest.raises(ValueError, match="prompt_len"):
        m.score_heads(b)


def test_attribute_loss_golden_by_hand():
    """float64, one prompt, K = 3, A = 2, fixed weights w = (0.25, 0.75):
    L = regression_weight * masked MSE(a, ratings) + preference_weight * BT(sum_i w_i sg(a_i))."""
    f64 = torch.float64
    a = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]], dtype=f64, requires_grad=True)
    w = torch.tensor([[0.25, 0.75]] * 3, dtype=f64, requires_grad=True)
    ratings = torch.tensor([[2.0, float("nan")], [0.5, 1.0], [0.0, 3.0]], dtype=f64)
    b = Comparisons(winner=torch.tensor([0, 0, 1]), loser=torch.tensor([1, 2, 2]))
    b.attributes, b.num_comparisons = ratings, 3
    out = AttributeLoss(regression_weight=2.0, preference_weight=0.5)(
        torch.zeros(3, dtype=f64), b, heads={"attributes": a, "weights": w}
    )
    # Regression: squared errors (1-2)^2 = 1, masked, (0.5-0.5)^2 = 0, (2-1)^2 = 1, (-1-0)^2 = 1,
    # (1-3)^2 = 4: 7 over 5 labelled = 1.4.
    assert out.parts["regression"].item() == pytest.approx(1.4, abs=1e-12)
    # Combination: 0.25*1 + 0.75*0 = 0.25, 0.25*0.5 + 0.75*2 = 1.625, 0.25*(-1) + 0.75*1 = 0.5, so
    # d = (0.25 - 1.625, 0.25 - 0.5, 1.625 - 0.5) = (-1.375, -0.25, 1.125), BT terms log(1 + e^{-d}):
    # log(1 + e^1.375) = 1.6004126516, log(1 + e^0.25) = 0.8259394199, log(1 + e^-1.125) = 0.2811501362,
    # mean 0.9025007359.
    terms = [math.log1p(math.exp(x)) for x in (1.375, 0.25, -1.125)]
    assert terms == pytest.approx([1.6004126516, 0.8259394199, 0.2811501362], abs=1e-10)
    assert out.terms.tolist() == pytest.approx(terms, abs=1e-12)
    assert out.parts["preference"].item() == pytest.approx(sum(terms) / 3, abs=1e-12)
    # Total: 2 * 1.4 + 0.5 * 0.9025007359 = 3.2512503680.
    assert out.loss.item() == pytest.approx(2 * 1.4 + 0.5 * sum(terms) / 3, abs=1e-12)
    assert out.loss.item() == pytest.approx(3.2512503680, abs=1e-10)
    out.loss.backward()
    # Outputs get the regression's gradient alone (stop-gradient in the BT term): 2 * 2 (a - y) / 5 = 0.8 (a - y).
    want = [[0.8 * (1 - 2), 0.0], [0.8 * (0.5 - 0.5), 0.8 * (2 - 1)], [0.8 * (-1 - 0), 0.8 * (1 - 3)]]
    torch.testing.assert_close(a.grad, torch.tensor(want, dtype=f64), rtol=0, atol=1e-15)
    # The gate gets the BT term's: dL/dw_ik = 0.5 * sum_c dBT/dd_c * (a_wk - a_lk), dBT/dd_c = -s(-d_c)/3.
    # s(1.375) = 0.7981867, s(0.25) = 0.5621765, s(-1.125) = 0.2451095.
    g = [-1 / (1 + math.exp(x)) / 3 for x in (-1.375, -0.25, 1.125)]  # -s(-d)/3 per comparison
    want_w = [
        [0.5 * (g[0] + g[1]) * a_k for a_k in (1.0, 0.0)],
        [0.5 * (-g[0] + g[2]) * a_k for a_k in (0.5, 2.0)],
        [0.5 * (-g[1] - g[2]) * a_k for a_k in (-1.0, 1.0)],
    ]
    torch.testing.assert_close(w.grad, torch.tensor(want_w, dtype=f64), rtol=0, atol=1e-15)


def test_attribute_loss_on_the_model_separates_the_stages():
    """On a real gated model: the regression term is the masked MSE of its outputs, the preference term is
    BT on its combination, and the preference term moves the gate and nothing else."""
    m = _model("gating")
    m.train()
    b = _batch(m)
    b.attributes[0, 1] = float("nan")  # a missing rating is masked
    r, heads = m.score_heads(b)
    out = AttributeLoss(regression_weight=1.0, preference_weight=0.0)(r, b, heads=heads)
    a, t = heads["attributes"].detach(), b.attributes
    keep = torch.isfinite(t)
    assert out.loss.item() == pytest.approx(float(((a - torch.nan_to_num(t)) ** 2)[keep].mean()), rel=1e-5)
    # Preference only: BT on sum_i w_i sg(a_i) moves the gate and nothing else.
    m.zero_grad()
    r, heads = m.score_heads(b)
    pref = AttributeLoss(regression_weight=0.0, preference_weight=1.0)(r, b, heads=heads)
    combined = (heads["weights"] * heads["attributes"]).sum(-1).detach()
    d = combined[b.winner] - combined[b.loser]
    bt = torch.where(
        b.tie,
        -0.5 * (torch.nn.functional.logsigmoid(d) + torch.nn.functional.logsigmoid(-d)),
        -torch.nn.functional.logsigmoid(d),
    )
    assert pref.loss.item() == pytest.approx(float(bt.mean()), rel=1e-5)
    pref.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.gate.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in m.named_parameters() if not n.startswith("gate."))
    with pytest.raises(ValueError, match="model.head=attributes"):
        AttributeLoss()(r, b)
    # preference_trains=all: the same BT value, but the pairs now also move the attribute head and backbone.
    m.zero_grad()
    r, heads = m.score_heads(b)
    joint = AttributeLoss(regression_weight=0.0, preference_weight=1.0, preference_trains="all")(r, b, heads=heads)
    assert joint.loss.item() == pytest.approx(float(bt.mean()), rel=1e-5)
    joint.loss.backward()
    assert m.head.weight.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.gate.parameters())
    with pytest.raises(ValueError, match="gate\\|all"):
        AttributeLoss(preference_trains="both")


def test_misconfigured_heads_raise():
    with pytest.raises(ValueError, match="model.head must be one of"):
        build_model(head="ranks")
    with pytest.raises(ValueError, match="attribute names"):
        attribute_options({"combine": "fixed"}, None)
    with pytest.raises(ValueError, match="weights has 2 values"):
        _model("fixed", [1.0, 2.0])
    with pytest.raises(ValueError, match="fixed\\|gating"):
        _model("mean")
    assert isinstance(head_default_loss(head="attributes"), AttributeLoss)


def test_pearson_matches_numpy():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g), torch.randn(50, generator=g)
    y = y + x
    assert pearson(x, y, min_n=3) == pytest.approx(float(np.corrcoef(x.numpy(), y.numpy())[0, 1]), abs=1e-9)
    y[3] = float("nan")  # missing ratings are skipped
    keep = torch.isfinite(y)
    assert pearson(x, y, min_n=3) == pytest.approx(float(np.corrcoef(x[keep].numpy(), y[keep].numpy())[0, 1]), abs=1e-9)


def test_export_is_a_multi_output_sequence_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    m = _model("gating", seed=2)
    b = _batch(m, n=2)
    with torch.no_grad():
        r, heads = m.score_heads(b)
    m.save_pretrained(tmp_path / "export")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert hf.config.num_labels == 3 and hf.config.id2label[2] == "polite" and hf.config.problem_type == "regression"
    with torch.no_grad():
        logits = hf(
            input_ids=b.input_ids, attention_mask=b.attention_mask
        ).logits  # right padding: HF's pad pooling is fine
    torch.testing.assert_close(logits, heads["attributes"], atol=1e-5, rtol=0)
    again = build_model(
        name_or_path=str(tmp_path / "export"), head="attributes"
    ).eval()  # names, combine and gate restored
    assert again.attributes == NAMES and again.combine == "gating"
    with torch.no_grad():
        torch.testing.assert_close(again.score_batch(b), r, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_attribute_head_recovers_the_true_qualities(tmp_path):
    """A short `experiment=heads model=attributes` run: the combined reward beats chance and each
    attribute output correlates with the simulator's true quality (the numbers are in head_report)."""
    from rmlab.train import run

    cfg = compose(
        [
            "experiment=heads",
            "model=attributes",
            "logger=csv",
            "trainer.max_steps=150",
            "trainer.max_epochs=1",
            "model.config.hidden_size=32",
            "model.config.intermediate_size=64",
            "model.config.num_hidden_layers=1",
            "data.simulator.num_prompts=900",
            "module.lr=3e-3",
            "threads=1",
            "export=false",
            "data.cache=false",
        ],
        tmp_path,
    )
    s = run(cfg)
    rep = s["head_report"]
    print("attribute correlations:", rep)
    assert s["val_acc"] > 0.56, s
    assert rep["attr_corr/format_ok"] > 0.3 and rep["attr_corr/polite"] > 0.3, rep
    # on_topic is reported (head_report) but needs the question read against the answer, which a 1-layer
    # random-init byte model does not learn in 150 steps; pretrained MiniLM recovers it
    # (`python train.py experiment=attributes`: 0.84, docs/heads.md), too long a run for this suite.
    assert "attr_corr/on_topic" in rep
    assert rep["reward_true_corr"] > 0.15, rep
