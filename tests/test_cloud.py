"""Models that write before they score: CLoud (a reward head after the critique) and reasoning judges.

Hand-checked row indices, the critique LM loss, the export read with plain transformers, deterministic greedy
generation, the critique cache, self-consistency on a hand-made case, the critique data field, and a short
training on Prometheus with the critique loss falling."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch.nn import functional as F

from rmlab.data.collate import collate
from rmlab.data.formats import records_to_groups
from rmlab.data.sources import DataError
from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import Comparison, DataReport, PreferenceGroup
from rmlab.losses import BTLoss, RegressionLoss
from rmlab.losses.base import Comparisons
from rmlab.losses.critique import CritiqueLoss
from rmlab.models import build_model, load_export
from rmlab.models.base import backbone_states
from rmlab.models.reasoning import mean_probability_logit
from tests.conftest import TINY_LLAMA, compose, needs_shared_data

pytestmark = pytest.mark.usefixtures("one_thread")
BYTE = 3  # ByT5 ids are byte + 3; eos = 1, pad = 0
EOS = 1


def ids(text: str) -> list[int]:
    return [b + BYTE for b in text.encode()]


def cloud(seed: int = 0, **gen):
    torch.manual_seed(seed)
    return build_model(
        "cloud", config=TINY_LLAMA, tokenizer="byt5", cue="|C:", max_critique_tokens=6,
        generation={"cache": False, **gen},
    ).eval()


def rows(model, groups, side="right"):
    toks = tokenize_groups([model.group_template(g) for g in groups], model.tokenizer, DataReport(), 256, 2)
    return collate(toks, model.tokenizer.pad_token_id, side)


GROUP = PreferenceGroup(
    prompt="Q?", responses=["ab", "c"], comparisons=[Comparison(0, 1)], critiques=["good", ""]
)


@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_head_reads_the_eos_after_the_critique_hand_checked(side):
    m = cloud()
    b = rows(m, [GROUP], side)
    # Row 0: "Q?" + "ab" + "|C:" + "good" + eos; row 1: "Q?" + "c" + "|C:" + eos (no critique).
    want0 = ids("Q?ab|C:good") + [EOS]
    want1 = ids("Q?c|C:") + [EOS]
    real = [r[mk.bool()].tolist() for r, mk in zip(b.input_ids, b.attention_mask)]
    assert real == [want0, want1]
    assert b.critique_len.tolist() == [5, 0]  # "good" + eos; none
    assert b.response_len.tolist() == [len("ab|C:"), len("c|C:") + 1]  # the critique is not the response
    m.train()
    r, heads = m.score_heads(b)
    m.eval()
    # By hand: the reward head on the hidden state at index 11 (row 0) and 6 (row 1), the eos after the critique.
    last = [len(want0) - 1, len(want1) - 1]
    assert last == [11, 6]
    off = [b.input_ids.shape[1] - len(x) if side == "left" else 0 for x in (want0, want1)]
    with torch.no_grad():
        h = backbone_states(m.hf, b.input_ids, b.attention_mask, b.position_ids)
        want_r = torch.stack([m.reward_head(h[i, off[i] + last[i]]) for i in range(2)]).reshape(-1)
        # The LM targets are "good" + eos (indices 7..11 of row 0), each predicted from the position before it.
        tgt = torch.tensor(ids("good") + [EOS])
        logits = m.lm_head(h[0, off[0] + 6 : off[0] + 11])
        want_nll = F.cross_entropy(logits.float(), tgt, reduction="sum")
    torch.testing.assert_close(r.detach(), want_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(heads["critique_nll"].detach(), torch.stack([want_nll, torch.tensor(0.0)]), atol=1e-4, rtol=0)
    assert heads["critique_tokens"].tolist() == [5.0, 0.0]


def test_scoring_cuts_each_row_back_to_the_cue_and_generates():
    m = cloud()
    b = rows(m, [GROUP])
    inputs = m.input_rows(b)
    assert inputs == [ids("Q?ab|C:"), ids("Q?c|C:")]
    with torch.inference_mode():
        r, heads = m.score_heads(b)
        gen = m.generate_critiques(inputs, 0)  # greedy: the same critiques again
        # By hand: the reward head at the eos after input + generated critique, each row alone.
        want = []
        for i, g in zip(inputs, gen):
            row = torch.tensor([i + g + [EOS]])
            h = backbone_states(m.hf, row, torch.ones_like(row))
            want.append(m.reward_head(h[0, -1]))
    assert all(0 < len(g) <= 6 and EOS not in g for g in gen)  # at most max_critique_tokens, cut at eos
    assert heads["critique_tokens_generated"].tolist() == [float(len(g)) for g in gen]
    assert heads["critique"] == [m.tokenizer.decode(g, skip_special_tokens=True) for g in gen]
    torch.testing.assert_close(r, torch.stack(want).reshape(-1), atol=1e-5, rtol=0)


def test_greedy_generation_is_deterministic_and_independent_of_the_batch():
    m = cloud(seed=3)
    groups = [
        PreferenceGroup(prompt=p, responses=[a, b], comparisons=[Comparison(0, 1)])
        for p, a, b in (("Hi", "hello there", "no"), ("What is 2+2?", "4", "five, I think"))
    ]
    b = rows(m, groups)
    with torch.inference_mode():
        r1, h1 = m.score_heads(b)
        r2, h2 = m.score_heads(b)
        alone = [m.score_heads(rows(m, [g]))[1]["critique"] for g in groups]
    assert h1["critique"] == h2["critique"]
    assert torch.equal(r1, r2)
    assert h1["critique"] == alone[0] + alone[1]  # left-padded batched generation = one group at a time
    assert len(set(h1["critique"])) > 1, "the critiques should differ between rows, or the check proves little"


def plain_transformers_reward(export_dir, prompt: str, response: str, critique: str | None = None):
    """The recipe of docs/heads.md, with plain transformers only (no rmlab import)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir)
    lm = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    head = load_file(f"{export_dir}/rmlab_reward_head.safetensors")
    cfg = lm.config.rmlab
    if critique is None:  # generate it, as config.rmlab.generation says (greedy here)
        ids = tok(prompt + response + cfg["cue"])["input_ids"]
        ids = ids[:-1] if ids[-1] == tok.eos_token_id else ids  # the row without its eos
        g = cfg["generation"]
        out = lm.generate(torch.tensor([ids]), max_new_tokens=g["max_new_tokens"], do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        critique = tok.decode(out, skip_special_tokens=True)
        row = ids + out + [tok.eos_token_id]  # the reward is read on the generated tokens, then the eos
    else:
        row = tok(prompt + response + cfg["cue"] + critique)["input_ids"]
        row = row if row[-1] == tok.eos_token_id else row + [tok.eos_token_id]
    with torch.no_grad():
        h = lm.model(torch.tensor([row])).last_hidden_state[0, -1]
    return float(h @ head["weight"][0] + head["bias"][0]), critique


def test_fixed_critique_through_rmlab_equals_the_plain_export(tmp_path):
    m = cloud(seed=5)
    out = m.save_pretrained(tmp_path / "export")
    back = load_export(str(out)).eval()
    assert back.kind == "cloud" and back.cue == "|C:" and back.max_critique_tokens == 6
    cases = [("Q?", "ab", "fine"), ("Tell me a joke", "Why did the chicken cross?", "meh!")]
    got = []
    for p, resp, crit in cases:
        b = rows(back, [PreferenceGroup(prompt=p, responses=[resp, "x"], comparisons=[Comparison(0, 1)], critiques=[crit, ""])])
        back.train()
        with torch.no_grad():
            got.append(float(back.score_heads(b)[0][0]))
        back.eval()
    want = [plain_transformers_reward(out, p, resp, crit)[0] for p, resp, crit in cases]
    assert want == pytest.approx(got, abs=1e-5)
    assert abs(got[0] - got[1]) > 1e-4, "different texts should score differently, or equality proves little"
    # And with the critique generated (greedy) on both sides: the same text and the same reward.
    b = rows(back, [PreferenceGroup(prompt="Q?", responses=["ab", "x"], comparisons=[Comparison(0, 1)])])
    with torch.inference_mode():
        r, heads = back.score_heads(b)
    plain_r, plain_crit = plain_transformers_reward(out, "Q?", "ab")
    assert plain_crit == heads["critique"][0]
    assert plain_r == pytest.approx(float(r[0]), abs=1e-5)


def test_critique_cache_hits_on_a_rerun(tmp_path, monkeypatch):
    from rmlab.score import Scorer

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    m = cloud(seed=7, cache=True)
    out = m.save_pretrained(tmp_path / "export")
    items = [("Q?", ["ab", "c"]), ("Hello", ["hi there", "go away"])]
    first_texts: list = []
    first = Scorer(load_export(str(out)), max_length=256, min_prompt_tokens=2).rows(items, first_texts)[0]
    files = list((tmp_path / "cache" / "critiques").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 4

    again = load_export(str(out))

    def no_generation(*a, **k):
        raise AssertionError("a re-run must read the cache, not generate")

    monkeypatch.setattr(again.hf, "generate", no_generation)
    texts: list = []
    second = Scorer(again, max_length=256, min_prompt_tokens=2).rows(items, texts)[0]
    assert second == first and texts == first_texts
    cache = next(iter(again._caches.values()))
    assert (cache.hits, cache.misses) == (4, 0)
    # Other generation settings are another key: they generate again.
    other = load_export(str(out), generation={"max_new_tokens": 3})
    Scorer(other, max_length=256, min_prompt_tokens=2).rows(items)
    assert next(iter(other._caches.values())).misses == 4


def test_critique_loss_golden_values_and_gradcheck():
    rewards = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64, requires_grad=True)
    nll = torch.tensor([6.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    count = torch.tensor([4.0, 0.0, 2.0], dtype=torch.float64)
    cmp = Comparisons(winner=torch.tensor([0, 2]), loser=torch.tensor([1, 1]))
    loss = CritiqueLoss(BTLoss(), lm_weight=0.5, reward_weight=2.0)
    out = loss(rewards, cmp, heads={"critique_nll": nll, "critique_tokens": count})
    lm = 9.0 / 6.0
    bt = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-0.75))) / 2
    assert float(out.loss) == pytest.approx(0.5 * lm + 2.0 * bt, abs=1e-12)
    assert float(out.parts["critique_lm"]) == pytest.approx(lm) and float(out.parts["reward_loss"]) == pytest.approx(bt)
    loss.reward_active = False  # stage 1: the reward term is reported, not trained
    out = loss(rewards, cmp, heads={"critique_nll": nll, "critique_tokens": count})
    assert float(out.loss) == pytest.approx(0.5 * lm, abs=1e-12)
    loss.reward_active = True

    def f(r, n):
        return loss(r, cmp, heads={"critique_nll": n, "critique_tokens": count}).loss

    assert torch.autograd.gradcheck(f, (rewards, nll))
    # Any reward loss: regression on scores.
    reg = CritiqueLoss(RegressionLoss(), lm_weight=1.0, reward_weight=1.0)
    c2 = Comparisons(winner=torch.zeros(0, dtype=torch.long), loser=torch.zeros(0, dtype=torch.long),
                     group_index=torch.zeros(3, dtype=torch.long), score=torch.tensor([2.0, float("nan"), 0.0], dtype=torch.float64))
    out = reg(rewards, c2, heads={"critique_nll": nll, "critique_tokens": count})
    assert float(out.loss) == pytest.approx(lm + ((1 - 2) ** 2 + 0.25**2) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="writes critiques"):
        loss(rewards, cmp)


def test_self_consistency_mean_of_answer_probabilities_hand_made():
    # Two rationales for two rows: P(yes) = (0.5, 0.75) for row 0 and (0.9, 0.1) for row 1.
    r = torch.tensor([[0.0, math.log(0.9 / 0.1)], [math.log(3.0), math.log(0.1 / 0.9)]])
    got = mean_probability_logit(r)
    assert got[0].item() == pytest.approx(math.log(0.625 / 0.375), abs=1e-6)  # mean P(yes) = 0.625
    assert got[1].item() == pytest.approx(0.0, abs=1e-6)  # mean P(yes) = 0.5
    assert mean_probability_logit(r[:1]).tolist() == pytest.approx(r[0].tolist(), abs=1e-6)  # k = 1: the reward itself
    # Saturated sigmoids (1 - s(40) = e^-40 is below float32's resolution): k = 1 still gives 40 and 60 back, and
    # two rationales at 40 and 60 give logit((s(40) + s(60)) / 2) = log 2 + 40 - log(1 + e^-20) = 40.6931471785.
    big = torch.tensor([[40.0], [60.0]])
    assert mean_probability_logit(big.T).tolist() == [40.0, 60.0]
    assert mean_probability_logit(big.double()).item() == pytest.approx(40 + math.log(2) - math.log1p(math.exp(-20)), abs=1e-9)


def test_reasoning_verifier_self_consistency_over_sampled_rationales():
    torch.manual_seed(2)
    m = build_model(
        "verifier", config=TINY_LLAMA, tokenizer="byt5", template="Q: {prompt}\nA: {response}\nGood? Y or N:",
        answers=["Y", "N"], reasoning=True, reasoning_cue="|R:", max_critique_tokens=5,
        generation={"do_sample": True, "samples": 3, "seed": 11, "cache": False},
    ).eval()
    g = PreferenceGroup(prompt="2+2", responses=["4", "5"], comparisons=[Comparison(0, 1)], critiques=["ok", "wrong"])
    b = rows(m, [g])
    # The row: template head + cue + rationale + answer cue + eos; the answer is read at the cue's ':'.
    real = b.input_ids[0][b.attention_mask[0].bool()].tolist()
    assert real == ids("Q: 2+2\nA: 4|R:ok\nGood? Y or N:") + [EOS]
    assert b.critique_len.tolist() == [len("ok\nGood? Y or N:") + 1, len("wrong\nGood? Y or N:") + 1]
    with torch.inference_mode():
        r, heads = m.score_heads(b)
        inputs = m.input_rows(b)
        assert inputs[0] == ids("Q: 2+2\nA: 4|R:")
        per = torch.stack([m.reward_on_rows(m.finish_rows(inputs, m.generate_critiques(inputs, s)), "cpu") for s in range(3)])
    assert not torch.equal(per[0], per[1]), "sampled rationales should differ, or the average proves little"
    p_yes = torch.sigmoid(per.double()).mean(0)
    torch.testing.assert_close(r.double(), torch.log(p_yes / (1 - p_yes)), atol=1e-5, rtol=0)
    with torch.inference_mode():
        assert torch.equal(m.score_heads(b)[0], r)  # sampling is seeded: the same draws again


def test_reasoning_judge_rows_show_both_critiques_in_order():
    torch.manual_seed(0)
    m = build_model(
        "judge", config=TINY_LLAMA, tokenizer="byt5", template="Q: {prompt}\nA: {response_a}\nB: {response_b}\nBetter?:",
        answers=["A", "B"], reasoning=True, reasoning_cue="|R:", max_critique_tokens=64,
    )
    out = m.group_template(PreferenceGroup(prompt="q", responses=["x", "y"], comparisons=[Comparison(1, 0)], critiques=["cx", "cy"]))
    assert out.responses == [
        "y\nB: x|R:Response A: cy\nResponse B: cx\nBetter?:",
        "x\nB: y|R:Response A: cx\nResponse B: cy\nBetter?:",
    ]
    assert out.labels == [1.0, 0.0] and out.critiques == [r.split("|R:")[1] for r in out.responses]


def test_critique_field_reads_a_list_with_its_index_and_extract():
    recs = [
        ("f:1", {"q": "P", "a": "r1", "s": 3, "fb": ["Feedback: one", "Feedback: two"]}),
        ("f:2", {"q": "P", "a": "r2", "s": 1, "fb": None}),
    ]
    fields = {"prompt": "q", "response": "a", "score": "s", "critique": "fb"}
    groups = records_to_groups(recs, "ratings", fields, DataReport(), critique_index=1, extract={"critique": ["Feedback:", None]})
    assert groups[0].critiques == ["two", ""]
    with pytest.raises(DataError, match="critique_index=5"):
        records_to_groups(recs, "ratings", fields, DataReport(), critique_index=5)
    # A head that does not write drops the critiques before tokenization: the scalar rows are unchanged.
    from rmlab.data.datamodule import RewardDataModule

    torch.manual_seed(0)
    scalar = build_model(config=TINY_LLAMA, tokenizer="byt5")
    dm = RewardDataModule(tokenizer=scalar.tokenizer, template=None, cache=False)
    toks = dm._tokenize(groups, DataReport())
    assert toks[0].response_ids == [ids("r1") + [EOS], ids("r2") + [EOS]] and toks[0].critique_lens == []


def metric_column(run_dir, name):
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


@needs_shared_data
def test_train_cloud_on_prometheus_critique_loss_falls_then_eval_and_score_report_it(tmp_path, monkeypatch):
    from rmlab.evaluate import run as eval_run
    from rmlab.score import main as score_main
    from rmlab.train import run

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    cfg = compose(
        ["model=cloud", "data=prometheus", "threads=1", "data.max_records=48", "trainer.max_steps=12", "trainer.max_epochs=4", "data.max_groups=2",
         "trainer.log_every_n_steps=1", "module.lr=3e-3", "model.max_critique_tokens=16", "data.max_length=256"],
        tmp_path / "run",
    )
    torch.manual_seed(0)
    before = build_model(**{k: v for k, v in cfg.model.items() if k != "_target_"}).state_dict()
    summary = run(cfg)
    lm = metric_column(tmp_path / "run", "train/critique_lm_step")
    assert len(lm) >= 10 and sum(lm[-3:]) / 3 < sum(lm[:3]) / 3 - 0.5, lm
    after = load_export(str(tmp_path / "run" / "export")).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), "every parameter (LM, backbone, reward head) should have moved"
    assert 0 < summary["head_report"]["critique_tokens_per_row"] <= 16  # generated, within model.max_critique_tokens
    # The run's summary shows the critique LM's val loss beside a uniform guess over the byte vocabulary (ln 384).
    from rmlab.summary import format_summary

    assert summary["critique_lm_uniform"] == pytest.approx(math.log(384))
    assert summary["metrics"]["val/critique_lm"] < summary["critique_lm_uniform"] - 0.3, summary["metrics"]
    assert f"critique LM loss (val, nats/token) {summary['metrics']['val/critique_lm']:6.3f}" in format_summary(summary)

    ev = compose(["data=prometheus", "data.max_records=48", f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt", "split=val"],
                 tmp_path / "eval", config_name="eval")
    res = eval_run(ev)
    assert 0 < res["metrics"]["head/critique_tokens_per_row"] <= 16
    worst = json.loads((tmp_path / "eval" / "metrics.json").read_text())["worst"]
    assert worst and all(isinstance(w["critique_chosen"], str) for w in worst)
    assert any(w["critique_chosen"].strip() for w in worst)  # the critiques were written, not left empty
    assert "Their generated critiques" in (tmp_path / "eval" / "report.md").read_text()

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "no"}) + "\n")
    score_main([str(src), "--model", str(tmp_path / "run" / "export"), "-o", str(tmp_path / "out.jsonl"), "--no-progress"])
    rec = json.loads((tmp_path / "out.jsonl").read_text())
    assert {"reward_chosen", "reward_rejected", "critique_chosen", "critique_rejected"} <= rec.keys()
    assert rec["p_chosen"] == pytest.approx(1 / (1 + math.exp(rec["reward_rejected"] - rec["reward_chosen"])))


@needs_shared_data
def test_two_stage_recipe_sft_then_reward_on_the_critics_critiques(tmp_path, monkeypatch):
    from rmlab.train import run

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    cfg = compose(
        ["experiment=cloud", "data.max_records=48", "data.max_groups=4", "trainer.max_epochs=2",
         "callbacks.critique_stages.sft_epochs=1", "model.max_critique_tokens=8", "data.max_length=256", "export=false"],
        tmp_path / "run",
    )
    run(cfg)
    with open(next((tmp_path / "run").rglob("metrics.csv"))) as f:
        epochs = [r for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert len(epochs) == 2
    # Stage 1 trains the critique LM alone: the loss is the LM term; stage 2 adds the reward term.
    e0, e1 = ({k: float(v) for k, v in r.items() if v} for r in epochs)
    assert e0["train/loss_epoch"] == pytest.approx(e0["train/critique_lm_epoch"], abs=1e-4)
    assert e1["train/loss_epoch"] == pytest.approx(e1["train/critique_lm_epoch"] + e1["train/reward_loss_epoch"], abs=1e-4)
    # The critic (the model at the end of stage 1) was saved, and it wrote one critique per training row, once.
    # Critiques are cached by weights: the critic's file also holds epoch 0's validation critiques (the same
    # weights); epoch 1's validation, after the weights moved, has a file of its own.
    assert (tmp_path / "run" / "critic.pt").exists()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    rows = {s: round(report[s]["k_per_prompt"]["mean"] * report[s]["groups"]) for s in ("train", "val")}
    files = list((tmp_path / "cache" / "critiques").glob("*.jsonl"))
    counts = sorted(len(f.read_text().splitlines()) for f in files)
    assert counts == [rows["val"], rows["train"] + rows["val"]], (rows, counts)


def test_reasoning_verifier_export_rebuilds_the_same_scorer(tmp_path):
    torch.manual_seed(4)
    m = build_model(
        "verifier", config=TINY_LLAMA, tokenizer="byt5", template="Q: {prompt}\nA: {response}\nGood? Y or N:",
        answers=["Y", "N"], reasoning=True, reasoning_cue="|R:", max_critique_tokens=7, generation={"cache": False},
    ).eval()
    out = m.save_pretrained(tmp_path / "export")
    back = load_export(str(out)).eval()
    assert type(back) is type(m) and back.cue == "|R:" and back.max_critique_tokens == 7
    assert back.suffix_ids == m.suffix_ids == ids("\nGood? Y or N:")
    g = PreferenceGroup(prompt="2+2", responses=["4", "5"], comparisons=[Comparison(0, 1)], critiques=["ok", "no"])
    b = rows(m, [g])
    with torch.inference_mode():
        r, h = m.score_heads(b)
        r2, h2 = back.score_heads(b)
    torch.testing.assert_close(r, r2, atol=1e-6, rtol=0)
    assert h["critique"] == h2["critique"]


@needs_shared_data
def test_eval_of_a_checkpoint_takes_the_commands_generation_settings(tmp_path, monkeypatch):
    """eval.py ckpt_path=<reasoning verifier> +model.generation.samples=3 scores with 3 sampled rationales (it
    kept the run's single greedy one, silently); a model that does not write refuses the override."""
    from omegaconf import OmegaConf

    from rmlab.evaluate import find_run_config, load_reward_model
    from rmlab.evaluate import run as eval_run
    from rmlab.train import run

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    cfg = compose(["model=generative_verifier", "model.reasoning=true", "data=prometheus", "threads=1", "data.max_records=40",
                   "trainer.max_steps=2", "model.max_critique_tokens=4", "data.max_length=256", "export=false"], tmp_path / "run")
    run(cfg)
    ckpt = f"{tmp_path}/run/checkpoints/last.ckpt"
    gen = OmegaConf.create({"name_or_path": "x", "generation": {"samples": 3, "do_sample": True, "seed": 5}})
    m = load_reward_model(ckpt, gen, find_run_config(ckpt))
    assert (m.generation.samples, m.generation.do_sample, m.generation.seed) == (3, True, 5)
    assert m.generation.max_new_tokens == 4 and m.max_critique_tokens == 4  # the rest as the run had it
    assert load_reward_model(ckpt, OmegaConf.create({"name_or_path": "x"}), find_run_config(ckpt)).generation.samples == 1

    ev = compose(["data=prometheus", "data.max_records=40", f"ckpt_path={ckpt}", "split=val", "+model.generation.samples=3",
                  "+model.generation.do_sample=true"], tmp_path / "eval", config_name="eval")
    got = eval_run(ev)["metrics"]
    assert got["head/generated_tokens_per_row"] == pytest.approx(3 * got["head/critique_tokens_per_row"])

    scalar = compose(["model=tiny_llama", "data=prometheus", "threads=1", "data.max_records=40", "trainer.max_steps=1",
                      "data.max_length=256", "export=false"], tmp_path / "scalar")
    run(scalar)
    sk = f"{tmp_path}/scalar/checkpoints/last.ckpt"
    with pytest.raises(ValueError, match="does not write before it scores"):
        load_reward_model(sk, gen, find_run_config(sk))
