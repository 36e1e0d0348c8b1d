"""Multi-attribute heads (ArmoRM): shapes, fixed and gated combination, the two-stage loss, export, and
recovery of the simulator's true qualities."""

from __future__ import annotations

import pytest
import torch

from rmlab.data.collate import collate
from rmlab.data.simulator import ATTRIBUTES, SimulatorConfig, generate
from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import DataReport
from rmlab.heads import AttributeRewardModel, head_size, pearson
from rmlab.losses.generative import AttributeLoss, head_default_loss
from rmlab.model import build_model
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


def test_attribute_loss_golden_and_stage_separation():
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


def test_misconfigured_heads_raise():
    with pytest.raises(ValueError, match="model.head must be one of"):
        head_size("ranks", None)
    with pytest.raises(ValueError, match="attribute names"):
        head_size("attributes", {"combine": "fixed"})
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
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x.numpy(), y.numpy())[0, 1]), abs=1e-9)
    y[3] = float("nan")  # missing ratings are skipped
    keep = torch.isfinite(y)
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x[keep].numpy(), y[keep].numpy())[0, 1]), abs=1e-9)


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
            "optim.lr=3e-3",
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
    # on_topic is reported but not recovered at this scale: it needs the response matched against the
    # question (and sums checked), which a 1-layer random-init byte model does not learn in 150 steps
    # (docs/heads.md: still ~0 after 586 steps of the 2-layer model).
    assert -1.0 <= rep["attr_corr/on_topic"] <= 1.0
    assert rep["reward_true_corr"] > 0.15, rep
