"""Exports score in plain transformers exactly as in rmlab on real chat tokenizers, including those whose pad
token is their eos (SmolLM2, Phi-3) or that have none (Llama 3.1): transformers pools at the last token that is
not pad_token_id, and rmlab's rows end with eos."""

from __future__ import annotations

import pytest
import torch

from rmlab.data.collate import collate
from rmlab.data.simulator import SimulatorConfig, generate
from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import DataReport
from tests.conftest import SHARED_DATA, TINY_LLAMA, needs_shared_data

TOKENIZERS = SHARED_DATA / "tokenizers"


@needs_shared_data
@pytest.mark.parametrize("name", ["smollm2_instruct", "phi3_mini_instruct", "llama3_1_instruct", "qwen2_5_instruct"])
def test_export_pad_is_never_eos_and_plain_transformers_gives_rmlabs_rewards(name, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmlab.models import build_model

    path = str(TOKENIZERS / name)
    original = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer=path, forward_mode="padded").eval()
    tok = model.tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    distinct = original.pad_token_id is not None and original.pad_token_id != original.eos_token_id
    assert distinct == (name == "qwen2_5_instruct")  # of the four, only Qwen2.5 ships a pad of its own ...
    if distinct:
        assert tok.pad_token_id == original.pad_token_id  # ... and it is kept as it is
    with torch.no_grad():
        model.head.weight.add_(0.1)
    groups = tokenize_groups(generate(SimulatorConfig(num_prompts=3, k=3, seed=3)), tok, DataReport(), 256, 8)
    b = collate(groups, tok.pad_token_id, "right")
    with torch.no_grad():
        ours = model.score_batch(b)
    assert all(row[-1] == tok.eos_token_id for g in groups for row in g.response_ids)  # rows end with eos

    out = model.save_pretrained(tmp_path / "export")
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    exported = AutoTokenizer.from_pretrained(out)
    assert hf.config.pad_token_id == exported.pad_token_id == tok.pad_token_id != exported.eos_token_id
    with torch.no_grad():
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)  # batched
    start = 0
    for g in groups:  # one prompt at a time (less padding): each group's rows give the same rewards
        rows = collate([g], exported.pad_token_id, "right")
        with torch.no_grad():
            theirs = hf(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits.squeeze(-1)
        torch.testing.assert_close(theirs, ours[start : start + g.k], atol=1e-5, rtol=0)
        start += g.k
    assert start == len(ours) == 9
    # Without an attention mask transformers finds the end by pad_token_id alone: still rmlab's position.
    with torch.no_grad():
        unmasked = hf(input_ids=b.input_ids).logits.squeeze(-1)
    torch.testing.assert_close(unmasked, ours, atol=1e-5, rtol=0)
