"""The scoring contract (docs/eval.md): the token rows rmlab trains and scores on are the ones downstream tools
build from the same conversation or text, on the real chat tokenizers.

- chat, causal LM: exactly ``apply_chat_template(messages, tokenize=True)``; ``reward_token=eos``: OpenRLHF's
  row (the template text without trailing whitespace, then eos unless last);
- plain text, causal LM: ``tokenizer(prompt + response)`` + eos unless last (``auto``), or nothing (``last``);
- ``rmlab.score`` on chat records gives plain transformers' rewards on the template's tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from rmlab.data.chat import DEFAULT_FALLBACK_TEMPLATE, split_conversations
from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import Comparison, DataReport, PreferenceGroup
from tests.conftest import SHARED_DATA, TINY_LLAMA, needs_shared_data

TOKENIZERS = SHARED_DATA / "tokenizers"
NAMES = ["qwen2_5_instruct", "llama3_1_instruct", "smollm2_instruct", "phi3_mini_instruct"]

USER = {"role": "user", "content": "Which is larger, 9.11 or 9.9?"}
CONVERSATIONS = [  # one prompt, three answers; the second prompt has a system turn and two user turns
    [
        [USER, {"role": "assistant", "content": "9.9 is larger."}],
        [USER, {"role": "assistant", "content": "9.11, since 11 > 9."}],
        [USER, {"role": "assistant", "content": "They are equal"}],
    ],
    [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": end},
        ]
        for end in ("No.", "Why did the chicken cross the road?  \n")
    ],
]


def tokenizer(name):
    from transformers import AutoTokenizer

    from rmlab.models.backbone import ensure_distinct_pad

    tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / name))
    ensure_distinct_pad(tok)
    return tok


def template_ids(tok, conv) -> list[int]:
    out = tok.apply_chat_template(conv, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def rows_of(tok, groups, reward_token="auto", max_length=1024) -> list[list[list[int]]]:
    toks = tokenize_groups(groups, tok, DataReport(), max_length, 0, reward_token)
    return [[t.prompt_ids + r for r in t.response_ids] for t in toks]


def chat_groups(tok) -> list[PreferenceGroup]:
    out = []
    for convs in CONVERSATIONS:
        prompt, responses = split_conversations(convs, tok, DEFAULT_FALLBACK_TEMPLATE)
        out.append(PreferenceGroup(prompt, responses, [Comparison(0, 1)], templated=True))
    return out


@needs_shared_data
@pytest.mark.parametrize("name", NAMES)
def test_chat_rows_are_exactly_the_templates_tokens(name):
    tok = tokenizer(name)
    groups = chat_groups(tok)
    for convs, rows, t in zip(CONVERSATIONS, rows_of(tok, groups), tokenize_groups(groups, tok, DataReport(), 1024, 0)):
        assert rows == [template_ids(tok, c) for c in convs]
        assert len(t.prompt_ids) > 3  # the prompt is shared (encoded once by a causal LM), not empty
    bos = tok.bos_token_id
    if name == "llama3_1_instruct":  # the template's own bos, once (the measurement had two)
        assert all(r[0] == bos and r[1] != bos for g in rows_of(tok, groups) for r in g)


@needs_shared_data
@pytest.mark.parametrize("name", NAMES)
def test_reward_token_eos_is_openrlhfs_row(name):
    tok = tokenizer(name)
    eos = tok.eos_token_id
    for convs, rows in zip(CONVERSATIONS, rows_of(tok, chat_groups(tok), "eos")):
        for conv, row in zip(convs, rows):
            # OpenRLHF's RewardDataset: the template text, trailing newline stripped, eos appended if missing.
            text = tok.apply_chat_template(conv, tokenize=False).rstrip("\n")
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert row == (want if want[-1] == eos else want + [eos])
            assert row[-1] == eos


@needs_shared_data
@pytest.mark.parametrize("name", NAMES)
def test_text_rows_are_the_tokenizers_own_plus_eos(name):
    tok = tokenizer(name)
    prompt = "\n\nHuman: spell hel\n\nAssistant: hel"  # "hel" + "lo" merges across the boundary in BPE
    responses = ["lo", "p me"]
    g = PreferenceGroup(prompt, responses, [Comparison(0, 1)])
    own = [tok(prompt + r)["input_ids"] for r in responses]
    eos = tok.eos_token_id
    assert rows_of(tok, [g])[0] == [r if r[-1] == eos else r + [eos] for r in own]
    assert rows_of(tok, [g], "last")[0] == own
    separately = tok(prompt, add_special_tokens=False)["input_ids"] + tok("lo", add_special_tokens=False)["input_ids"]
    if name != "phi3_mini_instruct":  # sentencepiece-style "▁" vocabularies may split alike
        assert separately != tok(prompt + "lo", add_special_tokens=False)["input_ids"]  # the case is a real one


@needs_shared_data
@pytest.mark.parametrize("name", NAMES)
def test_reward_token_eos_text_rows_are_openrlhfs(name):
    """Plain text under reward_token=eos is OpenRLHF's row: the text with its trailing newlines stripped,
    tokenized without added specials (OpenRLHF passes add_special_tokens=False in its reward dataset and its
    PPO prompts), then eos. Its reward dataset writes `" " + eos` as text: one space token more before the
    eos, which its PPO rows (the policy's ids up to its eos) do not have; rmlab builds the PPO row."""
    tok = tokenizer(name)
    eos = tok.eos_token_id
    prompt = "\n\nHuman: spell hel\n\nAssistant: hel"
    responses = ["lo\n", "p me"]
    g = PreferenceGroup(prompt, responses, [Comparison(0, 1)])
    texts = [(prompt + r).rstrip("\n") for r in responses]
    ppo = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    rows = rows_of(tok, [g], "eos")[0]
    assert rows == ppo
    if tok.bos_token_id is not None and tok(prompt)["input_ids"][0] == tok.bos_token_id:
        assert all(r[0] != tok.bos_token_id for r in rows)  # Llama 3.1, Phi-3: no bos, as OpenRLHF
    dataset = [tok(t + " " + tok.eos_token, add_special_tokens=False)["input_ids"] for t in texts]
    for d, r in zip(dataset, rows):  # the reward dataset's row: the same plus one space token before the eos
        assert len(d) == len(r) + 1 and d[:-2] == r[:-1] and d[-1] == r[-1] == eos
        assert tok.decode(d[-2:-1]).strip() == ""


def test_reward_token_is_checked_and_generative_heads_refuse_last():
    from transformers import ByT5Tokenizer

    g = PreferenceGroup("p", ["a", "b"], [Comparison(0, 1)])
    with pytest.raises(ValueError, match="reward_token"):
        tokenize_groups([g], ByT5Tokenizer(), DataReport(), 64, 0, "first")

    from omegaconf import OmegaConf

    from rmlab.validate import ConfigError, check_config

    cfg = OmegaConf.create({"data": {"reward_token": "last"}, "model": {"head": "verifier"}})
    with pytest.raises(ConfigError, match="reward_token"):
        check_config(cfg)


@needs_shared_data
@pytest.mark.parametrize("name", ["qwen2_5_instruct", "llama3_1_instruct", "smollm2_instruct"])
def test_score_chat_records_equal_transformers_on_apply_chat_template(name, tmp_path):
    """rmlab.score's three chat record shapes == AutoModelForSequenceClassification on the template's tokens,
    batched with padding on either side (the batch of 4 pads 3 rows)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmlab.models import build_model, load_export
    from rmlab.score import Scorer, score_file

    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer=str(TOKENIZERS / name), forward_mode="padded").eval()
    with torch.no_grad():
        model.head.weight.normal_()
    out = model.save_pretrained(tmp_path / "export", extra={"scoring": {"reward_token": "auto"}})

    convs = [c for group in CONVERSATIONS for c in group]
    a, b = CONVERSATIONS[0][0], CONVERSATIONS[0][1]
    records = [{"messages": c} for c in convs]
    records.append({"prompt": "Which is larger, 9.11 or 9.9?", "chosen": a[1:], "rejected": b[1:]})
    records.append({"prompt": a[:1], "completion": a[1:]})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    score_file(Scorer(load_export(str(out)), max_length=1024), str(src), str(tmp_path / "out.jsonl"), progress=False)
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    for side in ("right", "left"):
        tok.padding_side = side
        enc = tok.pad({"input_ids": [template_ids(tok, c) for c in convs]}, return_tensors="pt")
        with torch.no_grad():
            theirs = hf(**enc).logits[:, 0].tolist()
        assert [r["reward"] for r in scored[: len(convs)]] == pytest.approx(theirs, abs=1e-4)
    assert theirs[0] != pytest.approx(theirs[1], abs=1e-3)  # the model tells the responses apart
    assert scored[len(convs)]["reward_chosen"] == pytest.approx(theirs[0], abs=1e-4)
    assert scored[len(convs)]["reward_rejected"] == pytest.approx(theirs[1], abs=1e-4)
    assert scored[len(convs) + 1]["reward"] == pytest.approx(theirs[0], abs=1e-4)


def test_chat_export_without_a_template_saves_the_one_training_rendered_with(tmp_path):
    """ByT5 has no chat template: chat data is rendered with data.format_options.fallback_template, and the
    export's tokenizer carries it, so apply_chat_template downstream gives the rows rmlab trained on."""
    from transformers import AutoTokenizer

    from rmlab.data.datamodule import build_datamodule
    from rmlab.models import build_model

    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": a}] for i in range(8) for a in ("yes", "no")]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"chosen": a, "rejected": b}) + "\n" for a, b in zip(convs[::2], convs[1::2])))
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="padded")
    dm = build_datamodule(tokenizer=model.tokenizer, source=str(src), format="chat", val_fraction=0.5, cache=False)
    dm.setup("fit")
    meta = dm.scoring_meta()
    assert meta["format"] == "chat" and meta["chat_template"] == DEFAULT_FALLBACK_TEMPLATE
    out = model.save_pretrained(tmp_path / "export", extra={"scoring": meta})
    assert getattr(model.tokenizer, "chat_template", None) is None  # the live tokenizer is left as it was
    exported = AutoTokenizer.from_pretrained(out)
    rows = [g.prompt_ids + r for g in dm.train_groups + dm.val_groups for r in g.response_ids]
    want = [template_ids(exported, c) for c in convs]
    assert len(rows) == len(convs) and all(r in want for r in rows)
    assert json.loads((out / "config.json").read_text())["rmlab"]["scoring"]["chat"].startswith("apply_chat_template")


@needs_shared_data
@pytest.mark.parametrize("name", ["qwen2_5_instruct", "llama3_1_instruct"])
def test_training_data_module_builds_the_template_rows_and_eval_scores_them_as_rmlab_score(name, tmp_path):
    """data.format=chat through the real data module (training's and eval.py's path): every row is the
    conversation's apply_chat_template tokens, and eval's scoring loop gives Scorer.score_chat's rewards."""
    from rmlab.data.datamodule import build_datamodule
    from rmlab.evaluate import score_loader
    from rmlab.models import build_model
    from rmlab.score import Scorer

    convs = [
        [{"role": "user", "content": f"Name a prime above {i}."}, {"role": "assistant", "content": a}]
        for i in range(6)
        for a in (f"{i + 1}? no, it is {i * 7 + 11}.", "I would rather not.")
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"chosen": a, "rejected": b}) + "\n" for a, b in zip(convs[::2], convs[1::2])))
    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer=str(TOKENIZERS / name), forward_mode="padded").eval()
    with torch.no_grad():
        model.head.weight.normal_()
    tok = model.tokenizer
    dm = build_datamodule(tokenizer=tok, source=str(src), format="chat", val_fraction=0.5, cache=False)
    dm.setup("fit")
    groups = dm.train_groups + dm.val_groups
    rows = [g.prompt_ids + r for g in groups for r in g.response_ids]
    assert sorted(rows) == sorted(template_ids(tok, c) for c in convs)
    pred = score_loader(model, dm.eval_loader(groups))
    by_row = dict(zip(map(tuple, rows), pred.reward.tolist()))
    ours = Scorer(model, max_length=512).score_chat([[c] for c in convs])
    assert [by_row[tuple(template_ids(tok, c))] for c in convs] == pytest.approx([r[0] for r in ours], abs=1e-5)


@needs_shared_data
def test_an_export_trained_on_the_older_reward_token_eos_text_rows_is_warned_about(tmp_path, capsys):
    """Plain text under reward_token=eos was the tokenizer's own row (+ Llama's bos, trailing newlines kept) + eos
    until it became OpenRLHF's row (no specials, newlines stripped). An export trained then records the older row
    in config.rmlab.scoring.text; scoring it now builds the new one: its plain-text rewards are not the trained
    ones. Before: no word of it. Now: the Scorer says so and how to get the trained rows (reward_token='auto')."""
    from rmlab.data.tokenize import contract
    from rmlab.models import build_model, load_export
    from rmlab.score import Scorer

    torch.manual_seed(0)
    name = "llama3_1_instruct"
    out = build_model(config=TINY_LLAMA, tokenizer=str(SHARED_DATA / "tokenizers" / name)).eval().save_pretrained(
        tmp_path / "export")
    tok = tokenizer(name)
    older = contract(tok, "auto")["text"]  # the older eos text row is auto's: tokenizer(prompt + response) + eos
    assert older != contract(tok, "eos")["text"]
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for text, fmt, warned in [(older, "pairs", True), (contract(tok, "eos")["text"], "pairs", False), (older, "chat", False)]:
        cfg.setdefault("rmlab", {})["scoring"] = {"reward_token": "eos", "format": fmt, "text": text}
        cfg_path.write_text(json.dumps(cfg))
        capsys.readouterr()
        scorer = Scorer(load_export(str(out)))
        assert scorer.reward_token == "eos"
        err = capsys.readouterr().err
        assert ("plain-text rewards are not the trained ones" in err and "reward_token='auto'" in err) == warned, err
    # the remedy builds the older row exactly: the tokenizer's own ids (bos first) + eos
    g = PreferenceGroup("Human: hi\n\nAssistant: ", ["hello\n", "bye"], [Comparison(0, 1)])
    want = [tok(g.prompt + r)["input_ids"] + [tok.eos_token_id] for r in g.responses]
    assert rows_of(tok, [g], "auto")[0] == want and want[0][0] == tok.bos_token_id


@needs_shared_data
def test_plain_text_given_to_a_chat_trained_model_is_warned_about(tmp_path, capsys, caplog):
    """A model trained on chat conversations and given plain-text records ({prompt, response}, or eval.py on a
    plain-text data config) is scored by the plain-text rule, not through its chat template: another token row,
    another reward (the silent mismatch of issue 14). Before: no word of it. Now: the Scorer (once), rmlab.score and
    eval.py say so and what to give instead; chat records, and plain text to a plain-text model, stay quiet."""
    from rmlab.data.tokenize import contract
    from rmlab.evaluate import run
    from rmlab.models import build_model, load_export
    from rmlab.score import Scorer, main
    from tests.conftest import compose

    torch.manual_seed(0)
    name = "qwen2_5_instruct"
    out = build_model(config=TINY_LLAMA, tokenizer=str(TOKENIZERS / name)).eval().save_pretrained(tmp_path / "export")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    prompt, response = "Which is larger, 9.11 or 9.9?", "9.9 is larger."
    conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    words = "trained on chat conversations"
    for fmt in ("chat", "pairs"):
        cfg.setdefault("rmlab", {})["scoring"] = {"format": fmt, **contract(tokenizer(name), "auto")}
        cfg_path.write_text(json.dumps(cfg))
        capsys.readouterr()
        scorer = Scorer(load_export(str(out)))
        chat = scorer.score_chat([[conv]])[0][0]
        assert words not in capsys.readouterr().err
        plain = scorer.score([(prompt, [response])])[0][0]
        scorer.score([(prompt, [response])])
        err = capsys.readouterr().err
        assert err.count(words) == (fmt == "chat"), err  # once per Scorer
        assert abs(plain - chat) > 1e-4  # why it matters: the plain row is another row, another reward
        if fmt == "chat":
            assert "{messages}" in err and "data.format=chat" in err
        # python -m rmlab.score: plain records are warned about once, chat records not at all
        for recs, warned in [([{"prompt": prompt, "response": response}] * 2, fmt == "chat"), ([{"messages": conv}], False)]:
            src = tmp_path / "in.jsonl"
            src.write_text("".join(json.dumps(r) + "\n" for r in recs))
            main([str(src), "--model", str(out), "-o", str(tmp_path / "o.jsonl"), "--threads", "1", "--no-progress"])
            assert capsys.readouterr().err.count(words) == warned
    # eval.py on a plain-text data config, with the export trained on chat
    cfg["rmlab"]["scoring"]["format"] = "chat"
    cfg_path.write_text(json.dumps(cfg))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": prompt, "chosen": response, "rejected": "9.11"}) + "\n")
    chats = tmp_path / "chat.jsonl"
    chats.write_text(json.dumps({"chosen": conv, "rejected": [conv[0], {"role": "assistant", "content": "9.11"}]}) + "\n")
    for source, fmt, warned in [(data, "pairs", True), (chats, "chat", False)]:
        caplog.clear()
        run(compose([f"model.name_or_path={out}", "data=local", f"data.source={source}", f"data.format={fmt}",
                     "threads=1"], tmp_path / f"eval_{fmt}", "eval"))
        assert any(words in r.getMessage() for r in caplog.records) == warned
