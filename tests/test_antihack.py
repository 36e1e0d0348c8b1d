"""Objectives against reward hacking (issue 17 item 4): ODIN, GRM and HelpSteer2-Preference's scaled BT.

Golden values are closed forms written out with ``math`` from the papers' formulas, never by calling the loss under
test; gradients are checked with ``torch.autograd.gradcheck`` in float64. The model tests compare rmlab's ODIN
export and GRM log-probabilities with plain transformers (AutoModelForSequenceClassification, AutoModelForCausalLM).
The training tests run ``rmlab.train.run`` (train.py's path) on the tiny Llama with one thread.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from rmlab.data.collate import collate
from rmlab.data.tokenize import TokenizedGroup
from rmlab.losses import BTLoss, Comparisons, GRMLoss, MarginLoss, OdinLoss, ScaledBTLoss, batch_pearson
from rmlab.validate import ConfigError, check_config
from tests.conftest import TINY_LLAMA, compose

F64 = torch.float64
NAN = float("nan")


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


# ---------------------------------------------------------------- scaled BT (HelpSteer2-Preference)
def pairs4(**kw) -> Comparisons:
    """Two prompts, four comparisons: strengths 3, 1, none (-1), 0; margins of either sign; one tie."""
    base = dict(
        winner=torch.tensor([0, 0, 3, 4]),
        loser=torch.tensor([1, 2, 4, 5]),
        strength=torch.tensor([3, 1, -1, 0]),
        margin=t([2.0, -1.5, NAN, 0.5]),
        tie=torch.tensor([False, False, False, False]),
        group_index=torch.tensor([0, 0, 0, 1, 1, 1]),
        score=t([5.0, 2.0, 4.0, 3.0, 3.0, 1.0]),
    )
    return Comparisons(**{**base, **kw})


R6 = [1.0, -0.5, 0.25, 2.0, 0.0, 0.5]
D4 = [1.5, 0.75, 2.0, -0.5]  # r_w - r_l of pairs4


def test_scaled_bt_is_the_papers_formula():
    """Wang et al. 2024, sec. 3: L = mean over pairs of -m log sigmoid(r_w - r_l), m the preference magnitude."""
    r = t(R6)
    cases = {
        # strength: the level itself; -1 (none) takes the default 1; 0 (negligibly better) weighs nothing.
        "strength": [3.0, 1.0, 1.0, 0.0],
        "margin": [2.0, 1.5, 1.0, 0.5],  # |margin|, NaN -> default
        "rating": [3.0, 1.0, 0.0, 2.0],  # max(0, score_w - score_l)
    }
    for source, m in cases.items():
        want = sum(mi * softplus(-d) for mi, d in zip(m, D4)) / 4
        got = ScaledBTLoss(magnitude=source)(r, pairs4()).loss.item()
        assert got == pytest.approx(want, abs=1e-12), source
    # the pinned number, so a change in both the loss and this test's closed form shows up
    assert ScaledBTLoss()(r, pairs4()).loss.item() == pytest.approx(0.2795097128, abs=1e-9)
    # default magnitude 2 for the pair with none
    want = (3 * softplus(-1.5) + 1 * softplus(-0.75) + 2 * softplus(-2.0)) / 4
    assert ScaledBTLoss(default=2.0)(r, pairs4()).loss.item() == pytest.approx(want, abs=1e-12)


def test_no_existing_option_is_scaled_bt():
    """Why it is a new loss: BT's per-comparison weight normalises by the weights' sum, and the margin loss shifts
    the logit. Neither equals mean(m * BT) on this batch (they differ by the factor mean(m), and in shape)."""
    r, b = t(R6), pairs4()
    m = [3.0, 1.0, 1.0, 0.0]
    paper = sum(mi * softplus(-d) for mi, d in zip(m, D4)) / 4
    weighted = BTLoss()(r, pairs4(weight=t(m))).loss.item()
    assert weighted == pytest.approx(paper * 4 / sum(m), abs=1e-12)  # sum(m w l) / sum(m)
    assert abs(weighted - paper) > 0.05  # 4/5 of the paper's value here: sum(m) = 5 over 4 pairs
    assert abs(MarginLoss(source="strength", table="large")(r, b).loss.item() - paper) > 0.1


def test_scaled_bt_ties_and_balance():
    r = t(R6)
    b = pairs4(tie=torch.tensor([False, True, False, False]))
    tie = 0.5 * (softplus(-0.75) + softplus(0.75))
    want = (3 * softplus(-1.5) + 1 * tie + softplus(-2.0)) / 4
    assert ScaledBTLoss()(r, b).loss.item() == pytest.approx(want, abs=1e-12)
    # balance=group: prompt 0 has 2 comparisons, prompt 1 has 2: weights 1/2 each, the same mean here
    b = pairs4(winner=torch.tensor([0, 0, 1, 3]), loser=torch.tensor([1, 2, 2, 4]))
    d = [R6[0] - R6[1], R6[0] - R6[2], R6[1] - R6[2], R6[3] - R6[4]]
    m = [3.0, 1.0, 1.0, 0.0]
    terms = [mi * softplus(-di) for mi, di in zip(m, d)]
    want = (sum(terms[:3]) / 3 + terms[3]) / 2  # prompt 0: C(3,2) = 3 comparisons, prompt 1: 1
    assert ScaledBTLoss(balance="group")(r, b).loss.item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("source", ["strength", "margin", "rating"])
def test_scaled_bt_gradcheck_and_shift_invariance(source):
    loss, b = ScaledBTLoss(magnitude=source), pairs4(tie=torch.tensor([False, True, False, False]))
    r = (torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=F64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, b).loss, (r,), eps=1e-6, atol=1e-7)
    shifted = r.detach() + t([3.0, -7.0])[b.group_index]
    assert loss(shifted, b).loss.item() == pytest.approx(loss(r.detach(), b).loss.item(), abs=1e-10)


# ---------------------------------------------------------------- ODIN
Q4, L4, LEN4 = [0.5, -0.2, 1.0, 0.3], [0.1, 0.4, -0.3, 0.2], [10.0, 20.0, 5.0, 40.0]
WQ, WL = [1.0, 2.0, 0.0], [0.5, -1.0, 2.0]


def odin_case():
    b = Comparisons(winner=torch.tensor([0, 2]), loser=torch.tensor([1, 3]), response_len=t(LEN4),
                    group_index=torch.tensor([0, 0, 1, 1]))
    heads = {"quality": t(Q4), "length": t(L4), "quality_weight": t([WQ] * 4), "length_weight": t([WL] * 4)}
    return b, heads


def test_odin_golden():
    """Chen et al. 2024: BT on r_Q + r_L, - rho(r_L, len), + |rho(r_Q, len)|, + |cos(w_Q, w_L)|."""
    b, heads = odin_case()
    s = [q + x for q, x in zip(Q4, L4)]
    bt = (softplus(-(s[0] - s[1])) + softplus(-(s[2] - s[3]))) / 2
    rho_l, rho_q = pearson(L4, LEN4), pearson(Q4, LEN4)
    cos = sum(a * c for a, c in zip(WQ, WL)) / math.sqrt(sum(a * a for a in WQ) * sum(c * c for c in WL))
    out = OdinLoss(length_coef=0.7, quality_coef=2.0, ortho_coef=0.3)(t(Q4), b, heads=heads)
    want = bt - 0.7 * rho_l + 2.0 * abs(rho_q) + 0.3 * abs(cos)
    assert out.loss.item() == pytest.approx(want, abs=1e-9)
    assert out.loss.item() == pytest.approx(1.2744128000, abs=1e-9)
    assert out.parts["rho_length_head"].item() == pytest.approx(rho_l, abs=1e-12)
    assert out.parts["rho_quality_head"].item() == pytest.approx(rho_q, abs=1e-12)
    assert out.parts["preference"].item() == pytest.approx(bt, abs=1e-12)
    # coefficients 0: the base loss on the sum alone
    plain = OdinLoss(length_coef=0, quality_coef=0, ortho_coef=0)(t(Q4), b, heads=heads).loss.item()
    assert plain == pytest.approx(bt, abs=1e-12)


def test_odin_gradcheck():
    """Gradients of both heads' rewards and both weight vectors, in float64."""
    b, heads = odin_case()
    loss = OdinLoss(length_coef=0.7, quality_coef=2.0, ortho_coef=0.3, base=MarginLoss(source="value"))
    b.margin = t([0.5, NAN])
    g = torch.Generator().manual_seed(5)
    q, ln = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    wq, wl = torch.randn(3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)

    def f(q, ln, wq, wl):
        h = {"quality": q, "length": ln, "quality_weight": wq.expand(4, -1), "length_weight": wl.expand(4, -1)}
        return loss(q, b, heads=h).loss

    args = tuple(x.requires_grad_() for x in (q, ln, wq, wl))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


def test_odin_keyed_on_a_spurious_feature():
    """loss.feature=spurious: the same terms with the response's known spurious feature (the simulator's flattery
    count) in place of its length, by hand; a batch without the feature for every response is refused, named."""
    b, heads = odin_case()
    flat = [0.0, 2.0, 1.0, 0.0]
    b.spurious = t(flat)
    s = [q + x for q, x in zip(Q4, L4)]
    bt = (softplus(-(s[0] - s[1])) + softplus(-(s[2] - s[3]))) / 2
    cos = sum(a * c for a, c in zip(WQ, WL)) / math.sqrt(sum(a * a for a in WQ) * sum(c * c for c in WL))
    out = OdinLoss(length_coef=0.7, quality_coef=2.0, ortho_coef=0.3, feature="spurious")(t(Q4), b, heads=heads)
    want = bt - 0.7 * pearson(L4, flat) + 2.0 * abs(pearson(Q4, flat)) + 0.3 * abs(cos)
    assert out.loss.item() == pytest.approx(want, abs=1e-9)
    assert want != pytest.approx(OdinLoss(length_coef=0.7, quality_coef=2.0, ortho_coef=0.3)(t(Q4), b, heads=heads).loss.item())
    b.spurious = t([0.0, NAN, 1.0, 0.0])
    with pytest.raises(ValueError, match="hack_rate"):
        OdinLoss(feature="spurious")(t(Q4), b, heads=heads)
    with pytest.raises(ValueError, match="feature"):
        OdinLoss(feature="flattery")


def test_the_simulator_gives_its_spurious_feature_only_with_the_hack_on():
    from rmlab.data.simulator import SimulatorConfig, flattery_count, generate

    off = generate(SimulatorConfig(num_prompts=20, k=3, seed=2))
    on = generate(SimulatorConfig(num_prompts=20, k=3, seed=2, hack_rate=0.5))
    assert all(g.spurious is None for g in off)
    feats = [(f, r) for g in on for f, r in zip(g.spurious, g.responses)]
    assert all(f == flattery_count(r) for f, r in feats) and 0 < sum(f > 0 for f, _ in feats) < len(feats)


def test_batch_pearson_edge_cases():
    x = t([1.0, 2.0, 4.0])
    assert batch_pearson(x, t([3.0, 3.0, 3.0])).item() == 0.0  # equal lengths: no correlation to fit
    assert batch_pearson(t([1.0]), t([2.0])).item() == 0.0
    assert batch_pearson(x, 2 * x + 1).item() == pytest.approx(1.0, abs=1e-9)
    assert batch_pearson(x, -x).item() == pytest.approx(-1.0, abs=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        batch_pearson(x, t([1.0, 2.0]))


def test_odin_loss_refuses_a_model_without_its_heads():
    b, heads = odin_case()
    with pytest.raises(ValueError, match="model.head=odin"):
        OdinLoss()(t(Q4), b, heads={"quality": heads["quality"]})
    with pytest.raises(ValueError, match="rewards alone"):
        OdinLoss(base=OdinLoss())


# ---------------------------------------------------------------- GRM
def grm_case():
    # three responses of one prompt + a tie pair of another; response 1 wins one comparison, 0 wins two
    b = Comparisons(winner=torch.tensor([0, 0, 1, 3]), loser=torch.tensor([1, 2, 2, 4]),
                    tie=torch.tensor([False, False, False, True]), group_index=torch.tensor([0, 0, 0, 1, 1]))
    return b, [1.0, 0.2, -0.4, 0.3, 0.3], [-12.0, -30.0, NAN, -8.0, NAN]


def test_grm_golden():
    """Yang et al. 2024: (1 - alpha) L_pref + alpha mean_c -log sigmoid(beta log pi(y_w)), over non-tie pairs."""
    b, r, lp = grm_case()
    bt = (softplus(-0.8) + softplus(-1.4) + softplus(-0.6) + 0.5 * (softplus(0.0) + softplus(0.0))) / 4
    for form, term in (("logsigmoid", lambda x: softplus(-0.1 * x)), ("nll", lambda x: -x)):
        sft = (term(-12.0) + term(-12.0) + term(-30.0)) / 3  # winners 0, 0, 1; the tie has no chosen side
        out = GRMLoss(alpha=0.25, beta=0.1, form=form)(t(r), b, heads={"response_logp": t(lp)})
        assert out.loss.item() == pytest.approx(0.75 * bt + 0.25 * sft, abs=1e-12), form
        assert out.parts["sft"].item() == pytest.approx(sft, abs=1e-12)
    assert GRMLoss()(t(r), b, heads={"response_logp": t(lp)}).loss.item() == pytest.approx(0.4461500930, abs=1e-9)
    # alpha = 0 is the base loss alone
    assert GRMLoss(alpha=0.0)(t(r), b, heads={"response_logp": t(lp)}).loss.item() == pytest.approx(bt, abs=1e-12)


@pytest.mark.parametrize("form", ["logsigmoid", "nll"])
def test_grm_gradcheck(form):
    b, r, lp = grm_case()
    loss = GRMLoss(alpha=0.3, beta=0.5, form=form, base=MarginLoss(source="value"))
    b.margin = t([1.0, NAN, 0.5, NAN])
    r = t(r).requires_grad_()
    lp = t([-1.5, -3.0, -2.0, -0.5, -4.0]).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: loss(x, b, heads={"response_logp": y}).loss, (r, lp), eps=1e-6, atol=1e-7)


def test_grm_bad_options():
    for kw in ({"alpha": 1.5}, {"beta": 0.0}, {"form": "dpo"}):
        with pytest.raises(ValueError):
            GRMLoss(**kw)


# ---------------------------------------------------------------- models against plain transformers
def tiny_batch(padding_side: str = "right"):
    g1 = TokenizedGroup(prompt_ids=[5, 6, 7], response_ids=[[8, 9, 1], [10, 1]], winner=[0], loser=[1])
    g2 = TokenizedGroup(prompt_ids=[11, 12], response_ids=[[13, 14, 15, 16, 1], [17, 1]], winner=[1], loser=[0])
    return collate([g1, g2], pad_id=0, padding_side=padding_side)


def causal_logp(lm, batch) -> torch.Tensor:
    """log pi(response | prompt) of each row from a transformers causal LM's own logits, one unpadded row at a time."""
    out = []
    for i in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[i][batch.attention_mask[i].bool()][None]
        logp = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
        p0 = int(batch.prompt_len[i])
        out.append(sum(logp[p - 1, ids[0, p]].item() for p in range(p0, ids.shape[1])))
    return torch.tensor(out)


@pytest.fixture
def untied_causal_dir(tmp_path):
    """A tiny Llama causal LM with its own lm_head (untied), saved as a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, ByT5Tokenizer

    tok = ByT5Tokenizer()
    cfg = dict(TINY_LLAMA)
    cfg_hf = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tok), tie_word_embeddings=False,
                                  pad_token_id=0, **cfg)
    torch.manual_seed(3)
    lm = AutoModelForCausalLM.from_config(cfg_hf)
    lm.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_grm_logp_with_the_loaded_lm_head_equals_transformers(untied_causal_dir, padding_side):
    from transformers import AutoModelForCausalLM

    from rmlab.models import build_model

    model = build_model(name_or_path=str(untied_causal_dir), tokenizer="byt5").eval()
    model.require_outputs(("response_logp",))
    assert model.lm_source == "loaded" and "response_logp" in model.extra_outputs
    lm = AutoModelForCausalLM.from_pretrained(untied_causal_dir).eval()
    assert torch.equal(model.lm_weight, lm.lm_head.weight)
    assert "lm_weight" not in model.state_dict()  # frozen, not in checkpoints (strict reloads stay exact)
    batch = tiny_batch(padding_side)
    with torch.no_grad():
        rewards, heads = model.score_heads(batch)
        want = causal_logp(lm, batch)
        assert torch.allclose(rewards, model.score_batch(batch), atol=1e-5)
    winners = [0, 3]  # the chosen row of each group
    assert torch.allclose(heads["response_logp"][winners], want[winners], atol=1e-4)
    assert torch.isnan(heads["response_logp"][[1, 2]]).all()  # losers are not scored by the LM
    assert model.export_meta()["grm_lm_head"] == "loaded"


def test_grm_logp_tied_equals_a_tied_causal_lm():
    """A backbone built from a config has no LM head to load: the input embeddings are the LM head, exactly what a
    transformers causal LM with tie_word_embeddings=true computes from the same weights."""
    from transformers import AutoModelForCausalLM

    from rmlab.models import build_model

    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5").eval()
    model.require_outputs(("response_logp",))
    assert model.lm_source == "tied"
    cfg = model.hf.config.to_dict()
    cfg.update(tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    from transformers import LlamaConfig

    lm = AutoModelForCausalLM.from_config(LlamaConfig(**cfg)).eval()
    missing, _ = lm.model.load_state_dict(model.hf.model.state_dict(), strict=False)
    assert not missing
    lm.tie_weights()
    assert torch.equal(lm.lm_head.weight, model.hf.get_input_embeddings().weight)
    batch = tiny_batch()
    with torch.no_grad():
        lp = model.score_heads(batch)[1]["response_logp"]
        want = causal_logp(lm, batch)
    assert torch.allclose(lp[[0, 3]], want[[0, 3]], atol=1e-4)


def test_grm_refuses_encoders_and_other_heads(minilm):
    with pytest.raises(ValueError, match="causal LM"):
        minilm.require_outputs(("response_logp",))
    cfg = compose(["loss=grm", "model=minilm"], Path("/tmp/unused"))
    with pytest.raises(ConfigError, match="needs a causal LM"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="model.head=attributes: loss=grm"):
        check_config(compose(["loss=grm", "model=attributes"], Path("/tmp/unused")))
    with pytest.raises(ConfigError, match="must be odin with loss=odin"):
        check_config(compose(["loss=odin", "model=tiny_llama"], Path("/tmp/unused")))
    check_config(compose(["loss=grm"], Path("/tmp/unused")))  # the loss picks model=tiny_llama, a causal LM
    check_config(compose(["loss=odin"], Path("/tmp/unused")))  # the loss picks model=odin


def test_attribute_and_odin_heads_refuse_grm():
    from rmlab.models import build_model

    for model in (build_model(head="attributes", config=TINY_LLAMA, tokenizer="byt5", head_options={"attributes": ["a"]}),
                  build_model(head="odin", config=TINY_LLAMA, tokenizer="byt5")):
        with pytest.raises(ValueError, match="response_logp"):
            model.require_outputs(("response_logp",))
    with pytest.raises(ConfigError, match="model.head=odin: loss=grm"):
        check_config(compose(["loss=grm", "model=odin"], Path("/tmp/unused")))


def test_odin_export_is_the_quality_head_in_plain_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rmlab.models import build_model, load_export

    torch.manual_seed(0)
    model = build_model(head="odin", config=TINY_LLAMA, tokenizer="byt5").eval()
    batch = tiny_batch()
    with torch.no_grad():
        q, heads = model.score_heads(batch)
    assert torch.equal(q, heads["quality"]) and not torch.allclose(heads["quality"], heads["length"])
    assert torch.allclose(q, model.score_batch(batch), atol=1e-6)
    model.save_pretrained(tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert len(meta["id2label"]) == 1  # transformers' num_labels
    assert meta["rmlab"]["head"] == "odin" and meta["rmlab"]["reward"] == "quality_head"
    assert "quality head alone" in meta["rmlab"]["made_by"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert hf.config.num_labels == 1
    with torch.no_grad():
        logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert logits.shape == (4, 1)
    assert torch.allclose(logits[:, 0], q, atol=1e-5)
    back = load_export(str(tmp_path / "export")).eval()
    assert back.kind == "odin"
    assert torch.equal(back.length_head.weight, model.length_head.weight)
    with torch.no_grad():
        assert torch.allclose(back.score_heads(batch)[1]["length"], heads["length"], atol=1e-6)


def test_odin_on_an_encoder_reads_the_classifiers_features(minilm):
    """On MiniLM the two heads read the pooler's output, as BERT's classifier does: the quality head is then exactly
    transformers' own classification path (what the export gives)."""
    from rmlab.models import build_model

    model = build_model(head="odin", name_or_path="minilm").eval()
    tok = model.tokenizer
    rows = [tok("what is two plus two", "it is four")["input_ids"], tok("hi", "hello there, friend")["input_ids"]]
    g = TokenizedGroup(prompt_ids=[], response_ids=rows, winner=[0], loser=[1])
    batch = collate([g], pad_id=tok.pad_token_id)
    with torch.no_grad():
        q, heads = model.score_heads(batch)
        assert torch.allclose(q, model.score_batch(batch), atol=1e-5)
        assert heads["quality_weight"].shape == (2, 384)


# ---------------------------------------------------------------- training through train.py's path
TRAIN = [
    "seed=0", "threads=1", "data.cache=false", "module.lr=3e-3", "module.warmup_ratio=0",
    "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
]


def moved_parameters(cfg, out: Path) -> tuple[list[str], set[str]]:
    """(parameters that did not change, all parameter names) between the seeded initial model and last.ckpt."""
    from hydra.utils import instantiate

    torch.manual_seed(cfg.seed)
    init = instantiate(cfg.model, _convert_="all")
    before = {k: v.clone() for k, v in init.state_dict().items()}
    trained = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = {k.removeprefix("model."): v for k, v in trained.items() if k.startswith("model.")}
    names = {k for k, _ in init.named_parameters()}
    assert names <= set(trained), sorted(names - set(trained))[:5]
    return [k for k in names if torch.equal(before[k], trained[k])], names


def length_biased_pairs(path: Path, n: int = 600, bias: float = 0.8, seed: int = 0) -> None:
    """Simulator responses with 0-4 filler sentences appended ("I hope this helps."): the annotators' gap is the
    true-reward gap plus ``bias`` per extra filler sentence, so length is rewarded by the labels, not by the truth."""
    from rmlab.data.simulator import FILLER, SimulatorConfig, generate

    rng = random.Random(seed)
    with open(path, "w") as f:
        for g in generate(SimulatorConfig(num_prompts=n, k=2, seed=seed)):
            na, nb = rng.sample(range(5), 2)
            a = g.responses[0] + "".join(" " + rng.choice(FILLER) for _ in range(na))
            b = g.responses[1] + "".join(" " + rng.choice(FILLER) for _ in range(nb))
            gap = g.true_rewards[0] - g.true_rewards[1] + bias * (na - nb)
            chosen, rejected = (a, b) if gap > 0 else (b, a)
            f.write(json.dumps({"prompt": g.prompt, "chosen": chosen, "rejected": rejected}) + "\n")


@pytest.mark.slow
def test_odin_quality_head_resists_length_that_bt_learns(tmp_path):
    """On pairs whose labels reward filler length, BT's reward correlates with length on held-out prompts; ODIN's
    reward (the quality head) much less, while its length head takes the correlation up."""
    from rmlab.train import run

    data = tmp_path / "lenbias.jsonl"
    length_biased_pairs(data)
    common = [*TRAIN, "data=local", f"data.source={data}", "data.val_fraction=0.25", "trainer.max_epochs=2"]
    summaries = {}
    for loss, model in (("bt", "tiny_llama"), ("odin", "odin")):
        cfg = compose([f"model={model}", f"loss={loss}", *common], tmp_path / loss)
        summaries[loss] = run(cfg)
        if loss == "odin":
            unchanged, names = moved_parameters(cfg, tmp_path / loss)
            assert "length_head.weight" in names and not unchanged, unchanged
    bt, odin = summaries["bt"], summaries["odin"]
    rho_bt, rho_odin = bt["metrics"]["val/length/pearson"], odin["metrics"]["val/length/pearson"]
    assert rho_bt > 0.5, bt["metrics"]  # the hack is there to learn, and BT learns it
    assert abs(rho_odin) < rho_bt - 0.3, (rho_odin, rho_bt)
    assert odin["head_report"]["length_corr/quality"] == pytest.approx(rho_odin, abs=1e-6)
    assert odin["head_report"]["length_corr/length"] > rho_bt - 0.1  # the length head carries it instead
    assert (tmp_path / "odin" / "export" / "rmlab_length_head.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("loss, extra", [("grm", ["loss.alpha=0.1"]), ("scaled_bt", [])])
def test_grm_and_scaled_bt_train(tmp_path, loss, extra):
    """A few steps on the simulator: every parameter moves, the loss's parts are logged, accuracy beats chance."""
    from rmlab.train import run

    cfg = compose(["model=tiny_llama", f"loss={loss}", *TRAIN, *extra, "data.simulator.num_prompts=600",
                   "data.simulator.temperature=0.2", "trainer.max_epochs=1"], tmp_path)
    summary = run(cfg)
    unchanged, _ = moved_parameters(cfg, tmp_path)
    assert not unchanged, unchanged
    assert summary["val_acc"] > 0.55, summary["val_acc"]
    if loss == "grm":
        assert json.loads((tmp_path / "export" / "config.json").read_text())["rmlab"]["grm_lm_head"] == "tied"
        # The regulariser trains the backbone toward the chosen responses: the same run with alpha = 0 (the
        # term computed and logged, weighted 0) ends far higher (measured 2026-12-05: 28.2 against 54.4).
        cfg0 = compose(["model=tiny_llama", f"loss={loss}", *TRAIN, "loss.alpha=0.0", "data.simulator.num_prompts=600",
                        "data.simulator.temperature=0.2", "trainer.max_epochs=1"], tmp_path / "alpha0")
        sft0 = run(cfg0)["metrics"]["val/sft"]
        assert summary["metrics"]["val/sft"] < 0.75 * sft0, (summary["metrics"]["val/sft"], sft0)
