"""Losses: golden values by hand, gradcheck, invariances, equalities, shape guards, and short training runs.

Everything numeric runs in float64. Golden values are closed forms written out with ``math`` from the
formulas in the docstrings, never by calling the loss under test.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from rmlab.losses import (
    LLAMA2_MARGINS,
    BTLoss,
    Comparisons,
    DavidsonLoss,
    HingeLoss,
    LogExpLoss,
    MarginLoss,
    PlackettLuceLoss,
    RaoKupperLoss,
    RegressionLoss,
    center_term,
    masked_mse,
)
from tests.conftest import ROOT, compose

F64 = torch.float64
NAN = float("nan")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def lse(*xs: float) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# One prompt, K = 3, rewards r = (2, 0, -1), all C(3,2) comparisons best-first: d = (2, 3, 1).
R3 = [2.0, 0.0, -1.0]
D3 = [2.0, 3.0, 1.0]


def group3(**kw) -> Comparisons:
    base = dict(
        winner=torch.tensor([0, 0, 1]),
        loser=torch.tensor([1, 2, 2]),
        group_index=torch.tensor([0, 0, 0]),
        rank=t([0.0, 1.0, 2.0]),
        score=t([5.0, 3.0, 4.0]),
    )
    return Comparisons(**{**base, **kw})


def mixed_batch() -> Comparisons:
    """Three prompts (K = 3, 2, 4) with a tie, margins, strengths, a partial ranking and a missing rating."""
    win = [0, 0, 1, 3, 5, 5, 5, 6, 6, 7]
    los = [1, 2, 2, 4, 6, 7, 8, 7, 8, 8]
    gi = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    return Comparisons(
        winner=torch.tensor(win),
        loser=torch.tensor(los),
        margin=t([0.5, NAN, 1.0, 0.2, 0.3, NAN, 0.7, 0.1, 0.9, 0.4]),
        strength=torch.tensor([3, 2, -1, 0, 1, 3, 2, 1, 0, 2]),
        weight=t([1.0, 2.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        tie=torch.tensor([False, False, True, False, False, False, False, False, True, False]),
        group_index=torch.tensor(gi),
        rank=t([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, NAN, 1.0, 2.0]),
        score=t([5.0, 2.0, 3.0, NAN, 1.0, 4.0, 4.0, 2.0, 1.0]),
    )


# Every loss the repo ships, by name, with options that exercise its non-default paths.
LOSSES = {
    "bt": lambda: BTLoss(),
    "logexp": lambda: LogExpLoss(),
    "grouped": lambda: BTLoss(balance="group"),
    "margin_value": lambda: MarginLoss(source="value", scale=2.0),
    "margin_rating": lambda: MarginLoss(source="rating", scale=0.5),
    "margin_large": lambda: MarginLoss(source="strength", table="large"),
    "margin_small": lambda: MarginLoss(source="strength", table="small"),
    "hinge": lambda: HingeLoss(margin=1.0, source="value"),
    "davidson": lambda: DavidsonLoss(tie_param=0.7),
    "rao_kupper": lambda: RaoKupperLoss(tie_param=1.8),
    "plackett_luce": lambda: PlackettLuceLoss(),
    "plackett_luce_efron": lambda: PlackettLuceLoss(ties="efron"),
    "regression": lambda: RegressionLoss(scale=0.5, shift=-1.0),
    "center_pair": lambda: BTLoss(center_coef=0.3, center="pair"),
    "center_group": lambda: PlackettLuceLoss(center_coef=0.3, center="group"),
}
SHIFT_INVARIANT = {
    "bt",
    "logexp",
    "grouped",
    "margin_value",
    "margin_rating",
    "margin_large",
    "margin_small",
    "hinge",
    "davidson",
    "rao_kupper",
    "plackett_luce",
    "plackett_luce_efron",
}


# ---------------------------------------------------------------- golden values, one prompt, by hand
def test_bt_logexp_grouped_golden():
    want = sum(softplus(-d) for d in D3) / 3
    for loss in (BTLoss(), LogExpLoss(), BTLoss(balance="group")):
        assert loss(t(R3), group3()).loss.item() == pytest.approx(want, abs=1e-12)
    out = BTLoss()(t(R3), group3(weight=t([2.0, 1.0, 1.0])))
    assert out.loss.item() == pytest.approx((2 * softplus(-2) + softplus(-3) + softplus(-1)) / 4, abs=1e-12)
    assert out.terms.tolist() == pytest.approx([softplus(-d) for d in D3], abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, field, margins",
    [
        (dict(source="strength", table="small"), [NAN] * 3, [1.0, 1 / 3, 0.0]),  # strengths 3, 1, 0
        (dict(source="strength", table="large"), [NAN] * 3, [3.0, 1.0, 0.0]),
        (dict(source="strength", table="large", scale=0.5), [NAN] * 3, [1.5, 0.5, 0.0]),
        (dict(source="value", scale=2.0), [0.5, NAN, 2.0], [1.0, 0.0, 4.0]),  # explicit margin field
        (dict(source="rating", scale=0.5), [NAN] * 3, [1.0, 0.5, 0.0]),  # scores (5, 3, 4): gaps 2, 1, -1 -> 0
        (dict(source="prob"), [0.5, 0.75, NAN], [0.0, math.log(3.0), 0.0]),  # judge P -> logit
        (dict(source="none"), [0.5, 0.75, 1.0], [0.0, 0.0, 0.0]),
    ],
)
def test_margin_sources_golden(kwargs, field, margins):
    b = group3(margin=t(field), strength=torch.tensor([3, 1, 0]))
    want = sum(softplus(-(d - m)) for d, m in zip(D3, margins)) / 3
    assert MarginLoss(**kwargs)(t(R3), b).loss.item() == pytest.approx(want, abs=1e-12)


def test_margin_tables_are_llama2s():
    assert LLAMA2_MARGINS["large"] == (0.0, 1.0, 2.0, 3.0)
    assert LLAMA2_MARGINS["small"] == pytest.approx((0.0, 1 / 3, 2 / 3, 1.0))
    with pytest.raises(ValueError, match="0..3"):
        MarginLoss(source="strength")(t(R3), group3(strength=torch.tensor([4, 0, 0])))
    with pytest.raises(ValueError, match="probabilities"):
        MarginLoss(source="prob")(t(R3), group3(margin=t([1.5, 0.5, 0.5])))


def test_hinge_golden():
    # max(0, 2.5 - d) for d = (2, 3, 1) -> (0.5, 0, 1.5); with the Llama 2 large table on top: +(3, 1, 0).
    assert HingeLoss(margin=2.5)(t(R3), group3()).loss.item() == pytest.approx(2.0 / 3, abs=1e-12)
    b = group3(strength=torch.tensor([3, 1, 0]))
    assert HingeLoss(margin=2.5, source="strength")(t(R3), b).loss.item() == pytest.approx(
        (3.5 + 0.5 + 1.5) / 3, abs=1e-12
    )


def test_ties_golden():
    tie = torch.tensor([False, False, True])  # the 1-vs-2 comparison (d = 1) is a tie
    b = group3(tie=tie)
    half = 0.5 * (softplus(-1.0) + softplus(1.0))
    assert BTLoss()(t(R3), b).loss.item() == pytest.approx((softplus(-2) + softplus(-3) + half) / 3, abs=1e-12)
    # Davidson, nu = 1: win log(e^{d/2} + e^{-d/2} + 1) - d/2; tie the same minus log nu = 0.
    dav = lambda d: lse(d / 2, -d / 2, 0.0)  # noqa: E731
    want = (dav(2) - 1 + dav(3) - 1.5 + dav(1)) / 3
    assert DavidsonLoss(tie_param=1.0)(t(R3), b).loss.item() == pytest.approx(want, abs=1e-12)
    # Rao-Kupper, theta = 2: win log(1 + 2 e^{-d}); tie -log 3 - log s(d - log 2) - log s(-d - log 2).
    a = math.log(2.0)
    rk_tie = -math.log(3.0) + softplus(-(1 - a)) + softplus(1 + a)
    want = (math.log1p(2 * math.exp(-2)) + math.log1p(2 * math.exp(-3)) + rk_tie) / 3
    assert RaoKupperLoss(tie_param=2.0)(t(R3), b).loss.item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("loss", [DavidsonLoss(tie_param=1.0), RaoKupperLoss(tie_param=2.0)])
def test_tie_models_are_probabilities(loss):
    """At any d the model's P(w > l) + P(l > w) + P(tie) = 1; at d = 0 with these params each is 1/3."""
    for d in (0.0, 0.7, -2.3):
        r, b = (
            t([d, 0.0]),
            Comparisons(
                winner=torch.tensor([0, 1, 0]), loser=torch.tensor([1, 0, 1]), tie=torch.tensor([False, False, True])
            ),
        )
        p = torch.exp(
            -torch.stack(
                [
                    loss.pair_term(r[b.winner] - r[b.loser], b)[0],
                    loss.pair_term(r[b.winner] - r[b.loser], b)[1],
                    loss.tie_term(r[b.winner] - r[b.loser], b)[2],
                ]
            )
        )
        assert p.sum().item() == pytest.approx(1.0, abs=1e-7)
        if d == 0.0:
            assert p.tolist() == pytest.approx([1 / 3] * 3, abs=1e-7)


def test_plackett_luce_golden():
    want = ((lse(2, 0, -1) - 2) + (lse(0, -1) - 0)) / 2
    assert PlackettLuceLoss()(t(R3), group3()).loss.item() == pytest.approx(want, abs=1e-12)
    # The ranking, not the comparisons, drives PL: reverse it.
    rev = ((lse(2, 0, -1) + 1) + (lse(2, 0) - 0)) / 2
    assert PlackettLuceLoss()(t(R3), group3(rank=t([2.0, 1.0, 0.0]))).loss.item() == pytest.approx(rev, abs=1e-12)
    # Partial ranking: response 1 unranked -> the PL of 0 > 2 alone, K = 2.
    part = PlackettLuceLoss()(t(R3), group3(rank=t([0.0, NAN, 1.0]))).loss.item()
    assert part == pytest.approx(softplus(-3.0), abs=1e-12)


def test_plackett_luce_ties_golden():
    # Responses 1 and 2 tied below 0 (ranks 0, 1, 1), r = (2, 0, -1).
    b = group3(rank=t([0.0, 1.0, 1.0]))
    top = lse(2, 0, -1) - 2
    breslow = (top + (lse(0, -1) - 0) + (lse(0, -1) + 1)) / 2
    assert PlackettLuceLoss(ties="breslow")(t(R3), b).loss.item() == pytest.approx(breslow, abs=1e-12)
    # Efron: the second of the two tied sees half the tie's mass removed: log((e^0 + e^-1)/2) + 1.
    efron = (top + (lse(0, -1) - 0) + (lse(0, -1) - math.log(2) + 1)) / 2
    assert PlackettLuceLoss(ties="efron")(t(R3), b).loss.item() == pytest.approx(efron, abs=1e-12)
    # A fully tied pair: Breslow = 2 x BT-at-1/2, Efron = that minus log 2; both minimal at equal rewards.
    pair = Comparisons(
        winner=torch.tensor([0]), loser=torch.tensor([1]), group_index=torch.tensor([0, 0]), rank=t([0.0, 0.0])
    )
    half = 0.5 * (softplus(-0.3) + softplus(0.3))
    assert PlackettLuceLoss()(t([0.3, 0.0]), pair).loss.item() == pytest.approx(2 * half, abs=1e-12)
    assert PlackettLuceLoss(ties="efron")(t([0.3, 0.0]), pair).loss.item() == pytest.approx(
        2 * half - math.log(2), abs=1e-12
    )


def test_regression_golden_and_mask():
    r, b = t([2.0, 0.0, -1.0]), group3(score=t([5.0, NAN, 1.0]))
    assert RegressionLoss()(r, b).loss.item() == pytest.approx(((2 - 5) ** 2 + (-1 - 1) ** 2) / 2, abs=1e-12)
    # y = 0.5 * score - 1: targets 1.5 and -0.5.
    assert RegressionLoss(scale=0.5, shift=-1.0)(r, b).loss.item() == pytest.approx((0.5**2 + 0.5**2) / 2, abs=1e-12)
    # Pointwise batches: zero comparisons are fine; no labels at all gives 0 and a zero gradient.
    rr = t([1.0, 2.0]).requires_grad_()
    none = Comparisons(
        winner=torch.zeros(0, dtype=torch.long),
        loser=torch.zeros(0, dtype=torch.long),
        group_index=torch.tensor([0, 1]),
        score=t([NAN, 4.0]),
        label=t([NAN, NAN]),
    )
    assert RegressionLoss()(rr, none).loss.item() == pytest.approx(4.0)
    out = RegressionLoss(target="label")(rr, none)
    out.loss.backward()
    assert out.loss.item() == 0.0 and rr.grad.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="no broadcasting"):
        masked_mse(t([[1.0], [2.0]]), t([1.0, 2.0]))


def test_center_golden_composes_with_any_loss():
    # pair: mean((r_w + r_l)^2) = mean(4, 1, 1) = 2; group: (mean r)^2 = (1/3)^2.
    assert center_term(t(R3), group3(), "pair").item() == pytest.approx(2.0, abs=1e-12)
    assert center_term(t(R3), group3(), "group").item() == pytest.approx(1 / 9, abs=1e-12)
    for name in ("bt", "plackett_luce", "regression", "hinge", "davidson"):
        plain, centered = LOSSES[name](), LOSSES[name]()
        centered.center_coef = 0.1
        a, c = plain(t(R3), group3()), centered(t(R3), group3())
        assert c.loss.item() == pytest.approx(a.loss.item() + 0.1 * 2.0, abs=1e-12), name
        assert c.parts["center"].item() == pytest.approx(2.0, abs=1e-12)


def test_grouped_weights_prompts_equally():
    """Eq 6 on two prompts, K = 3 (3 pairs) and K = 2 (1 pair): the lone pair weighs as much as all three."""
    r = t([2.0, 0.0, -1.0, 0.5, 0.0])
    b = Comparisons(
        winner=torch.tensor([0, 0, 1, 3]), loser=torch.tensor([1, 2, 2, 4]), group_index=torch.tensor([0, 0, 0, 1, 1])
    )
    assert b.group_weight.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    want = 0.5 * (sum(softplus(-d) for d in D3) / 3 + softplus(-0.5))
    assert BTLoss(balance="group")(r, b).loss.item() == pytest.approx(want, abs=1e-12)
    assert BTLoss()(r, b).loss.item() == pytest.approx((sum(softplus(-d) for d in D3) + softplus(-0.5)) / 4, abs=1e-12)


# ---------------------------------------------------------------- gradcheck and invariances, every loss
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name):
    loss, b = LOSSES[name](), mixed_batch()
    r = (torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=F64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, b).loss, (r,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_group_shift_invariance(name):
    """Adding a constant per prompt to its rewards leaves BT-family and PL losses unchanged; centering and
    regression see the offset, on purpose."""
    loss, b = LOSSES[name](), mixed_batch()
    r = torch.randn(9, generator=torch.Generator().manual_seed(2), dtype=F64)
    shifted = r + t([3.0, -7.0, 11.0])[b.group_index]
    a, s = loss(r, b).loss.item(), loss(shifted, b).loss.item()
    if name in SHIFT_INVARIANT:
        assert s == pytest.approx(a, abs=1e-10)
    else:
        assert abs(s - a) > 1e-3


# ---------------------------------------------------------------- equalities
def test_plackett_luce_k2_equals_bt():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(40, generator=g, dtype=F64) * 5
    n = 20
    first_wins = torch.rand(n, generator=g) < 0.5
    idx = torch.arange(n)
    win, los = torch.where(first_wins, 2 * idx, 2 * idx + 1), torch.where(first_wins, 2 * idx + 1, 2 * idx)
    rank = torch.empty(40, dtype=F64)
    rank[win], rank[los] = 0.0, 1.0
    b = Comparisons(winner=win, loser=los, group_index=idx.repeat_interleave(2), rank=rank)
    for ties in ("breslow", "efron"):
        assert abs(PlackettLuceLoss(ties=ties)(r, b).loss.item() - BTLoss()(r, b).loss.item()) < 1e-9


def test_grouped_equals_mean_over_prompts_of_mean_bt():
    """On a collated simulator batch (K from 2 to 5, all C(K,2) pairs): eq 6 == the explicit double mean."""
    from rmlab.data.collate import collate
    from rmlab.data.simulator import SimulatorConfig, generate
    from rmlab.data.tokenize import tokenize_groups
    from rmlab.data.types import DataReport
    from rmlab.model import build_tokenizer

    groups = generate(SimulatorConfig(num_prompts=12, k=2, k_max=5, tie_band=0.0, seed=4))
    tg = tokenize_groups(groups, build_tokenizer("byt5", None), DataReport(), max_length=512)
    batch = collate(tg, pad_id=0)
    assert len({g.k for g in tg}) > 1  # K really varies
    r = torch.randn(batch.input_ids.shape[0], generator=torch.Generator().manual_seed(5), dtype=F64)
    per_prompt = []
    for gi in range(batch.num_groups):
        sel = batch.cmp_group == gi
        d = r[batch.winner[sel]] - r[batch.loser[sel]]
        k = int((batch.group_index == gi).sum())
        assert int(sel.sum()) == math.comb(k, 2)
        per_prompt.append(torch.nn.functional.softplus(-d).mean())
    want = torch.stack(per_prompt).mean().item()
    # The collator stores the 1/C(K,2) weights in float32: equal to float32 precision.
    assert BTLoss(balance="group")(r, batch).loss.item() == pytest.approx(want, rel=1e-7)
    assert abs(BTLoss()(r, batch).loss.item() - want) > 1e-4  # plain BT weighs large K more


def test_logexp_equals_bt_at_extremes():
    d = t([-1e4, -1e3, -50.0, -1.0, -1e-8, 0.0, 1e-8, 1.0, 50.0, 1e3, 1e4])
    r = torch.stack([d, torch.zeros_like(d)], 1).reshape(-1).requires_grad_()
    b = Comparisons(winner=torch.arange(0, 22, 2), loser=torch.arange(1, 22, 2))
    outs = []
    for loss in (BTLoss(), LogExpLoss()):
        o = loss(r, b)
        (g,) = torch.autograd.grad(o.loss, r)
        assert torch.isfinite(o.terms).all() and torch.isfinite(g).all()
        outs.append((o.terms, g))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    # Gradients too, including d = 0 (index 5), where max(x,0) + log1p(exp(-|x|)) gets 1 instead of 1/2.
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)
    assert outs[1][1][10].item() == pytest.approx(-0.5 / 11, abs=1e-15)
    assert outs[0][0][0].item() == pytest.approx(1e4)  # -log s(-1e4) = 1e4, not inf
    # float32 too: the dtype training uses.
    for loss in (BTLoss(), LogExpLoss()):
        assert torch.isfinite(loss(r.detach().float(), b).terms).all()


# ---------------------------------------------------------------- misuse raises
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shape_guards(name):
    loss, b = LOSSES[name](), mixed_batch()
    r = torch.zeros(9, dtype=F64)
    with pytest.raises(ValueError, match=r"\[B,1\] - \[B\]"):
        loss(r[:, None], b)  # a [N,1] head output
    with pytest.raises(ValueError, match="margin"):
        loss(r, Comparisons(**{**vars(mixed_batch()), "margin": t([0.0] * 3)}))
    with pytest.raises(ValueError, match="indexes response"):
        loss(r[:5], Comparisons(**{**vars(mixed_batch()), "group_index": None, "rank": None, "score": None}))
    with pytest.raises(TypeError):
        loss(torch.zeros(9, dtype=torch.long), b)


def test_bad_options_raise():
    for bad in (
        lambda: BTLoss(balance="prompt"),
        lambda: BTLoss(center="mean"),
        lambda: BTLoss(center_coef=-1),
        lambda: MarginLoss(source="gap"),
        lambda: MarginLoss(table="medium"),
        lambda: PlackettLuceLoss(ties="avg"),
        lambda: DavidsonLoss(tie_param=0.0),
        lambda: RaoKupperLoss(tie_param=1.0),
        lambda: RegressionLoss(target="y"),
    ):
        with pytest.raises(ValueError):
            bad()


def test_learned_tie_param_is_trainable():
    loss = DavidsonLoss(tie_param=1.0, learn_tie_param=True)
    assert [n for n, _ in loss.named_parameters()] == ["log_tie"]
    b = group3(tie=torch.tensor([True, True, True]))
    loss(t([0.0, 0.0, 0.0]), b).loss.backward()
    assert loss.log_tie.grad.item() < 0  # all ties: the likelihood wants a larger nu


# ---------------------------------------------------------------- training on the simulator
LOSS_YAMLS = sorted(p.stem for p in (ROOT / "conf" / "loss").glob("*.yaml"))
_RUNS: dict[str, list[dict[str, str]]] = {}
# Few steps on purpose: float32 rounding differences between bt and logexp grow with every step at this lr.
STEPS = 15


def train_rows(name: str, tmp_root: Path) -> list[dict[str, str]]:
    """Train tiny_llama with loss=<name> on a small simulator, repeated for several epochs, once per name."""
    if name not in _RUNS:
        from rmlab.train import run

        out = tmp_root / name
        cfg = compose(
            [
                f"model={OWN_MODEL.get(name, 'tiny_llama')}",
                f"loss={name}",
                "seed=0",
                "threads=1",
                "export=false",
                "data.simulator.num_prompts=24",
                "data.cache=false",
                "data.max_groups=8",
                "trainer.max_epochs=-1",
                f"trainer.max_steps={STEPS}",
                "trainer.log_every_n_steps=1",
                "trainer.check_val_every_n_epoch=1000",
                "trainer.enable_progress_bar=false",
                "optim.lr=1e-3",
                "optim.warmup_ratio=0",
                "optim.scheduler=constant",
                "~callbacks.model_checkpoint",
                "~callbacks.progress_bar",
            ],
            out,
        )
        run(cfg)
        with open(out / "csv" / "metrics.csv") as f:
            _RUNS[name] = list(csv.DictReader(f))
    return _RUNS[name]


def logged(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loss_runs")


# Losses that need another head: the loss yaml picks that model by default (its defaults list), and so does this test.
OWN_MODEL = {"attributes": "attributes", "answer_ce": "pairwise_judge"}


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSS_YAMLS)
def test_every_loss_yaml_trains(name, runs_dir):
    rows = train_rows(name, runs_dir)
    steps = logged(rows, "train/loss_step")
    epochs = logged(rows, "train/loss_epoch")
    assert len(steps) == STEPS and all(math.isfinite(x) for x in steps)
    # Same prompts every epoch, so epoch means compare like with like.
    assert len(epochs) >= 2
    assert epochs[-1] < epochs[0], f"loss={name} did not fall: epoch means {epochs}"


@pytest.mark.slow
def test_bt_and_logexp_training_curves_agree(runs_dir):
    bt, le = train_rows("bt", runs_dir), train_rows("logexp", runs_dir)
    for key in ("train/loss_step", "train/acc_step", "val/loss", "val/acc"):
        a, b = logged(bt, key), logged(le, key)
        assert len(a) == len(b) > 0, key
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, key
    assert len(logged(bt, "train/loss_step")) == STEPS
