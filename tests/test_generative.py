"""Generative reward models: the verifier's reward is log P(yes) - log P(no), start-up checks, judge rows,
order averaging against a planted position bias, the answer cross-entropy, export, and short trainings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rmlab.data.collate import collate
from rmlab.data.simulator import SimulatorConfig, generate
from rmlab.data.templates import GroupTemplate
from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import Comparison, DataReport, PreferenceGroup
from rmlab.losses.base import Comparisons
from rmlab.losses.heads import AnswerCELoss
from rmlab.models import build_model
from rmlab.models.generative import check_restricted_head, judge_stats
from tests.conftest import TINY_LLAMA, compose

VERIFIER = "Q: {prompt}\nA: {response}\nGood? Y or N:"
JUDGE = "Q: {prompt}\nA: {response_a}\nB: {response_b}\nBetter? A or B:"
BYTE = 3  # ByT5 ids are byte + 3


@pytest.fixture(scope="module")
def verifier():
    torch.manual_seed(0)
    return build_model(
        "verifier", config=TINY_LLAMA, tokenizer="byt5", template=VERIFIER, answers=["Y", "N"]
    ).eval()


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(1)
    return build_model("judge", config=TINY_LLAMA, tokenizer="byt5", template=JUDGE, answers=["A", "B"]).eval()


def _batch(model, n=4, side="right", seed=3):
    groups = [model.group_template(g) for g in generate(SimulatorConfig(num_prompts=n, k=3, seed=seed))]
    toks = tokenize_groups(groups, model.tokenizer, DataReport(), max_length=1024, min_prompt_tokens=8)
    return collate(toks, model.tokenizer.pad_token_id, side)


def _scores(model, b):
    with torch.no_grad():
        return model(b.input_ids, b.attention_mask, b.position_ids)


@pytest.mark.parametrize("side", ["right", "left"])
def test_verifier_reward_is_log_prob_difference_from_full_logits(verifier, side):
    b = _batch(verifier, side=side)
    r = _scores(verifier, b)
    with torch.no_grad():
        logits = verifier.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    lp = torch.log_softmax(logits.double(), -1)  # the whole vocabulary, by hand
    rows = torch.arange(b.input_ids.shape[0])
    last = torch.tensor([int(torch.nonzero(m).max()) for m in b.attention_mask])
    ans = last - 1  # the row ends "...Y or N:" + </s>; the answer is predicted at ':'
    assert (b.input_ids[rows, last] == verifier.tokenizer.eos_token_id).all()
    assert (b.input_ids[rows, ans] == ord(":") + BYTE).all()
    yes, no = ord("Y") + BYTE, ord("N") + BYTE
    assert verifier.answer_ids == (yes, no)
    want = lp[rows, ans, yes] - lp[rows, ans, no]
    assert r.shape == (b.input_ids.shape[0],)
    assert float(r.std()) > 1e-4, "rewards must differ across rows, or the comparison proves little"
    torch.testing.assert_close(r.double(), want, atol=1e-5, rtol=0)


def test_answers_and_template_checked_at_start_up():
    with pytest.raises(ValueError, match=r"'Yes' encodes as 3 tokens"):
        build_model("verifier", config=TINY_LLAMA, tokenizer="byt5", template=VERIFIER, answers=["Yes", "No"])
    ids = [ord("Y") + BYTE, ord("N") + BYTE]
    m = build_model(
        "verifier", config=TINY_LLAMA, tokenizer="byt5", template=VERIFIER, answers=["Yes", "No"], answer_ids=ids
    )
    assert m.answer_ids == tuple(ids)
    with pytest.raises(ValueError, match="two distinct ids"):
        build_model("verifier", config=TINY_LLAMA, tokenizer="byt5", template=VERIFIER, answer_ids=[5, 5])
    with pytest.raises(ValueError, match="map to the same token"):
        build_model("verifier", config=TINY_LLAMA, tokenizer="byt5", template=VERIFIER, answers=["Y", "Y"])
    for bad, why in (
        ("Q: {prompt} Good? Y or N:", "exactly once"),  # no {response}
        ("{prompt} {response} {extra} Y or N:", "exactly once"),
        ("{prompt} {response} {response} Y or N:", "exactly once"),
        ("{prompt} {response} Y or N: ", "whitespace"),
    ):
        with pytest.raises(ValueError, match=why):
            GroupTemplate("verifier", bad)
    with pytest.raises(ValueError, match="before"):
        GroupTemplate("judge", "{prompt} {response_b} {response_a} A or B:")
    with pytest.raises(ValueError, match="kind"):
        GroupTemplate("critic", VERIFIER)


def test_logit_post_processing_is_caught(verifier):
    """An LM whose logits are transformed after the head (soft-capping, scaling) would make the two-row
    reward wrong; the start-up check compares it with the full logits and refuses."""
    handle = verifier.lm_head.register_forward_hook(lambda mod, inp, out: 2.0 * out)
    try:
        with pytest.raises(ValueError, match="post-processes its logits"):
            check_restricted_head(verifier)
    finally:
        handle.remove()
    check_restricted_head(verifier)


def _group():
    return PreferenceGroup(
        prompt="Why?",
        responses=["r0", "r1", "r2"],
        comparisons=[Comparison(1, 0), Comparison(2, 1, tie=True), Comparison(0, 2, strength=3)],
        true_rewards=[0.5, 2.0, 1.0],
        labels=[0.0, 1.0, 1.0],
        attributes=[[0.0], [1.0], [1.0]],
        group_id="g",
    )


def test_verifier_rows_keep_a_shared_prefix_and_the_labels():
    g = GroupTemplate("verifier", VERIFIER)(_group())
    assert g.prompt == "Q: Why?\nA: "
    assert g.responses == ["r0\nGood? Y or N:", "r1\nGood? Y or N:", "r2\nGood? Y or N:"]
    assert g.labels == [0.0, 1.0, 1.0] and [(c.winner, c.loser) for c in g.comparisons] == [(1, 0), (2, 1), (0, 2)]


def test_judge_rows_show_both_orders():
    g = GroupTemplate("judge", JUDGE)(_group())
    assert g.prompt == "Q: Why?\nA: "
    # comparison (1 beats 0): row 0 shows the chosen as A, row 1 as B.
    assert g.responses[:2] == ["r1\nB: r0\nBetter? A or B:", "r0\nB: r1\nBetter? A or B:"]
    assert len(g.responses) == 6
    assert g.labels == [1.0, 0.0, 0.5, 0.5, 1.0, 0.0]  # the tie's two rows are 1/2
    assert [(c.winner, c.loser, c.tie) for c in g.comparisons] == [(0, 1, False), (2, 3, True), (4, 5, False)]
    assert g.comparisons[2].strength == 3
    assert g.true_rewards[:2] == [1.5, -1.5]  # "A beats B" truth: the gap, so the oracle still reads r_w > r_l
    assert g.attributes is None and g.scores is None
    empty = PreferenceGroup(prompt="p", responses=["a"], comparisons=[], labels=[1.0])
    assert GroupTemplate("judge", JUDGE)(empty) is None


def _with_answer_bias(judge, bias_a: float, zero_weights: bool = False):
    """A copy of the judge whose LM head adds ``bias_a`` to the logit of "A": a planted position bias."""
    import copy

    m = copy.deepcopy(judge)
    old = m.hf.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.zeros_like(old.weight) if zero_weights else old.weight)
        head.bias.zero_()
        head.bias[m.answer_ids[0]] = bias_a
    m.hf.set_output_embeddings(head)
    m.lm_head = head
    check_restricted_head(m)  # the head's bias is part of the two-row reward
    return m


def test_judge_order_averaging_cancels_a_planted_position_bias(judge):
    b = _batch(judge, n=6)
    plain = _scores(judge, b)
    biased_model = _with_answer_bias(judge, 5.0)
    biased = _scores(biased_model, b)
    torch.testing.assert_close(biased, plain + 5.0, atol=1e-4, rtol=0)
    assert float(plain.abs().max()) < 5.0, "the plant must dominate the untrained judge"
    s0, s1 = judge_stats(plain, b.winner, b.loser, b.tie), judge_stats(biased, b.winner, b.loser, b.tie)
    # Every single-order verdict is now "A": chosen-first always right, chosen-second always wrong,
    # and every comparison flips when the order is swapped.
    assert s1["acc_chosen_first"] == 1.0 and s1["acc_chosen_second"] == 0.0
    assert s1["position_bias_rate"] == 1.0
    # The order-averaged verdict, P(chosen) = (s(r1) + s(-r2)) / 2 > 1/2 iff r1 > r2, does not move.
    assert s1["acc"] == s0["acc"]
    r1, r2 = plain[b.winner][~b.tie], plain[b.loser][~b.tie]
    assert s0["position_bias_rate"] == pytest.approx(float(((r1 > 0) == (r2 > 0)).double().mean()))
    # The verdicts by hand: order-averaged (1 if r1 > r2, 1/2 if equal), then each order alone.
    verdict = [1.0 if a > c else 0.5 if a == c else 0.0 for a, c in zip(r1.tolist(), r2.tolist())]
    assert s0["acc"] == pytest.approx(sum(verdict) / len(verdict), abs=1e-12) and 0 < s0["acc"] < 1
    assert s0["acc_chosen_first"] == pytest.approx(sum(a > 0 for a in r1.tolist()) / len(r1), abs=1e-12)
    assert s0["acc_chosen_second"] == pytest.approx(sum(c < 0 for c in r2.tolist()) / len(r2), abs=1e-12)
    p = 0.5 * (torch.sigmoid(r1.double()) + torch.sigmoid(-r2.double()))
    assert s0["p_chosen"] == pytest.approx(float(p.mean()), abs=1e-9)
    assert s0["comparisons"] == int((~b.tie).sum()) > 0


def test_a_judge_that_only_sees_position_scores_ties(judge):
    """Zero weights and a bias on "A": the same output for every row. Averaged over both orders
    P(chosen) is exactly 1/2, which scores as a tie (0.5), and the bias rate is 1."""
    b = _batch(judge, n=3)
    r = _scores(_with_answer_bias(judge, 2.0, zero_weights=True), b)
    torch.testing.assert_close(r, torch.full_like(r, 2.0))
    s = judge_stats(r, b.winner, b.loser, b.tie)
    assert s["p_chosen"] == 0.5 and s["acc"] == 0.5 and s["position_bias_rate"] == 1.0


def test_answer_cross_entropy_golden_values():
    """float64, by hand: L = mean over labelled rows of -[y log s(r) + (1 - y) log s(-r)], s = sigmoid."""
    f64 = torch.float64
    r = torch.tensor([0.0, 2.0, -1.0, 0.5], dtype=f64, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, float("nan"), 0.5], dtype=f64)
    cmp = Comparisons(winner=torch.tensor([1]), loser=torch.tensor([0]), label=labels)
    out = AnswerCELoss()(r, cmp)
    # r = 0, y = 1:   -log s(0) = log 2                                   = 0.6931471806
    # r = 2, y = 0:   -log s(-2) = log(1 + e^2) = log 8.3890560989         = 2.1269280110
    # r = -1, y = NaN: masked
    # r = 0.5, y = 0.5: (log(1 + e^-0.5) + log(1 + e^0.5)) / 2
    #                 = (0.4740769842 + 0.9740769842) / 2                 = 0.7240769842
    # mean = (0.6931471806 + 2.1269280110 + 0.7240769842) / 3             = 1.1813840586
    terms = [math.log(2.0), math.log(1 + math.exp(2.0)), (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2]
    assert terms == pytest.approx([0.6931471806, 2.1269280110, 0.7240769842], abs=1e-10)
    assert out.loss.dtype == f64
    assert out.loss.item() == pytest.approx(sum(terms) / 3, abs=1e-12)
    assert out.loss.item() == pytest.approx(1.1813840586, abs=1e-10)
    assert out.terms.tolist() == pytest.approx(terms, abs=1e-12)
    out.loss.backward()
    # dL/dr = (s(r) - y) / 3 on labelled rows: (0.5 - 1)/3 = -0.1666666667, s(2)/3 = 0.8807970780/3 =
    # 0.2935990260, 0 for the unlabelled row, (s(0.5) - 0.5)/3 = (0.6224593312 - 0.5)/3 = 0.0408197771.
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [(s(0.0) - 1) / 3, s(2.0) / 3, 0.0, (s(0.5) - 0.5) / 3]
    assert want == pytest.approx([-0.1666666667, 0.2935990260, 0.0, 0.0408197771], abs=1e-10)
    assert r.grad.tolist() == pytest.approx(want, abs=1e-12)
    assert r.grad[2] == 0.0  # the unlabelled row gets no gradient, exactly
    none = AnswerCELoss()(
        r, Comparisons(winner=torch.tensor([1]), loser=torch.tensor([0]), label=torch.full((4,), float("nan")))
    )
    assert none.loss.item() == 0.0 and none.loss.requires_grad


def test_pointwise_answer_ce_steps_toward_the_labels():
    """Objective (b): a few steps of cross-entropy on the simulator's 0/1 labels raise P(yes) on the
    labelled-good rows relative to the labelled-bad ones, on one fixed batch."""
    torch.manual_seed(0)
    m = build_model("verifier", config=TINY_LLAMA, tokenizer="byt5", template=VERIFIER, answers=["Y", "N"])
    b = _batch(m, n=4, seed=5)
    assert 0 < float(b.label.nansum()) < b.label.numel()
    loss_fn = AnswerCELoss()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = loss_fn(m(b.input_ids, b.attention_mask, b.position_ids), b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    r = _scores(m, b)
    assert losses[-1] < losses[0] - 0.05
    assert float(r[b.label == 1].mean()) > float(r[b.label == 0].mean())


def test_export_loads_as_a_plain_causal_lm(verifier, tmp_path):
    from transformers import AutoModelForCausalLM

    verifier.save_pretrained(tmp_path / "export")
    b = _batch(verifier, n=2)
    r = _scores(verifier, b)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        logits = lm(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    rows = torch.arange(b.input_ids.shape[0])
    ans = verifier.answer_index(b.attention_mask)
    yes, no = verifier.answer_ids
    torch.testing.assert_close(logits[rows, ans, yes] - logits[rows, ans, no], r, atol=1e-5, rtol=0)
    again = build_model("verifier", name_or_path=str(tmp_path / "export")).eval()  # template + answers restored
    assert again.group_template.template == VERIFIER and again.answer_ids == verifier.answer_ids
    torch.testing.assert_close(_scores(again, b), r, atol=1e-5, rtol=0)


def _short_run(model: str, tmp_path, steps: int, extra: list[str] = ()):
    """One real `train.py experiment=heads` run, shrunk to fit the test budget on 2 shared cores."""
    from rmlab.train import run

    cfg = compose(
        [
            "experiment=heads",
            f"model={model}",
            "logger=csv",
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=1",
            "model.config.hidden_size=32",
            "model.config.intermediate_size=64",
            "model.config.num_hidden_layers=1",
            "module.lr=3e-3",
            "threads=1",
            "export=false",
            "data.cache=false",
            *extra,
        ],
        tmp_path,
    )
    return run(cfg)


@pytest.mark.slow
def test_verifier_trains_with_bt_and_beats_chance(tmp_path):
    s = _short_run("generative_verifier", tmp_path, 60, ["data.simulator.num_prompts=400"])
    assert s["train_steps"] == 60
    assert s["val_acc"] > 0.56, s


@pytest.mark.slow
def test_pairwise_judge_trains_with_cross_entropy_and_beats_chance(tmp_path):
    # Rows hold two responses: smaller batches and a larger lr than the verifier's to learn within budget.
    s = _short_run(
        "pairwise_judge", tmp_path, 100, ["data.simulator.num_prompts=500", "data.max_groups=4", "module.lr=1e-2"]
    )
    rep = s["head_report"]
    print("judge report:", rep)
    assert rep["acc"] > 0.55, rep  # order-averaged: position bias cannot inflate it
    assert 0.0 <= rep["position_bias_rate"] <= 1.0 and rep["comparisons"] > 50
    # A share of the comparisons (sign r1 == sign r2), at least the gap between the two single-order
    # accuracies (P(both > 0) + P(both <= 0) >= |P(r1 > 0) - P(r2 <= 0)|), and acc a multiple of 1/2n.
    k = rep["comparisons"]
    assert rep["position_bias_rate"] * k == pytest.approx(round(rep["position_bias_rate"] * k), abs=1e-6)
    assert rep["position_bias_rate"] >= abs(rep["acc_chosen_first"] - rep["acc_chosen_second"]) - 1e-9
    assert 2 * rep["acc"] * k == pytest.approx(round(2 * rep["acc"] * k), abs=1e-6)  # a mean in float64
    assert s["val_acc"] == pytest.approx(rep["acc"], abs=1e-6)  # the shared metric is the order-averaged verdict


def test_export_read_with_recipe_gives_rmlabs_reward_from_text(verifier, tmp_path):
    """config.rmlab.read_with, followed literally by a plain tool on a Llama-vocabulary model: the template as
    text, tokenizer(text) + eos, the answer logits' difference at the token before that eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmlab.score import Scorer
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "tokenizers" / "llama3_1_instruct"
    if not path.is_dir():
        pytest.skip("needs ../shared/data")
    torch.manual_seed(0)
    m = build_model("verifier", config=TINY_LLAMA, tokenizer=str(path), answers=[" Yes", " No"]).eval()
    out = m.save_pretrained(tmp_path / "export")
    meta = m.hf.config.rmlab
    assert "token before the final eos" in meta["read_with"]
    items = [("What is 2+2?", ["4", "five, I think"])]
    ours = Scorer(m, max_length=256).score(items)[0]
    lm, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    theirs = []
    for response in items[0][1]:
        ids = tok(meta["template"].format(prompt=items[0][0], response=response))["input_ids"]
        ids = ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0, -2]
        theirs.append((logits[meta["answer_ids"][0]] - logits[meta["answer_ids"][1]]).item())
    assert ours == pytest.approx(theirs, abs=1e-4) and ours[0] != pytest.approx(ours[1], abs=1e-4)
