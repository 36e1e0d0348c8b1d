"""RewardModel: pooling by attention mask, the scalar-head contract, export to plain transformers."""

from __future__ import annotations

import pytest
import torch

from rmlab.data.collate import collate
from rmlab.data.simulator import SimulatorConfig, generate
from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import DataReport
from rmlab.models import ScalarRewardModel, build_model, pool_index
from tests.conftest import TINY_LLAMA


def _groups(model, n=3, k=3):
    gs = generate(SimulatorConfig(num_prompts=n, k=k, seed=3))
    return tokenize_groups(gs, model.tokenizer, DataReport(), max_length=256, min_prompt_tokens=8)


def _rewards(model, groups, pad_id, side):
    b = collate(groups, pad_id, side)
    with torch.no_grad():
        return model(b.input_ids, b.attention_mask, b.position_ids)


def _singles(model, groups, pad_id):
    out = []
    for g in groups:
        for r in g.response_ids:
            ids = torch.tensor([g.prompt_ids + r])
            with torch.no_grad():
                out.append(model(ids, torch.ones_like(ids)))
    return torch.cat(out)


def test_pool_index_left_right():
    m = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert pool_index(m, "last").tolist() == [2, 4, 4]
    assert pool_index(m, "first").tolist() == [0, 2, 0]
    with pytest.raises(ValueError, match="no real token"):
        pool_index(torch.tensor([[0, 0]]), "last")


@pytest.fixture(scope="module")
def minilm_last():
    """MiniLM read at its last real token (pooling=last) instead of [CLS]: the last-token rule on an encoder."""
    return build_model(name_or_path="minilm", pooling="last").eval()


@pytest.mark.parametrize("backbone", ["tiny_llama", "minilm", "minilm_last"])
@pytest.mark.parametrize("case", ["right", "left", "pad_eq_eos"])
def test_pooling_matches_unpadded_forward(backbone, case, request):
    model = request.getfixturevalue(backbone)
    groups = _groups(model)
    tok = model.tokenizer
    # pad == eos: pad with the token that also ends every row ([SEP] for the encoder, </s> for the LM).
    pad = (tok.sep_token_id or tok.eos_token_id) if case == "pad_eq_eos" else tok.pad_token_id
    side = "left" if case == "left" else "right"
    batched = _rewards(model, groups, pad, side)
    single = _singles(model, groups, pad)
    assert batched.shape == single.shape
    lens = {len(g.prompt_ids) + len(r) for g in groups for r in g.response_ids}
    assert len(lens) > 1, "the test needs rows of different lengths, or padding is never exercised"
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_pad_eq_eos_naive_pooling_would_be_wrong(tiny_llama):
    """The pitfall the mask avoids: the 'first pad token' rule lands before the real <eos>."""
    tok = tiny_llama.tokenizer
    g = _groups(tiny_llama, n=1)
    b = collate(g, tok.eos_token_id, "right")
    first_pad = (b.input_ids == tok.eos_token_id).int().argmax(-1) - 1  # what pad-based pooling picks
    assert (first_pad != pool_index(b.attention_mask, "last")).any()


def test_scalar_head_contract():
    from transformers import AutoConfig, AutoModelForSequenceClassification, ByT5Tokenizer

    cfg = AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": 384}, num_labels=2)
    hf = AutoModelForSequenceClassification.from_config(cfg)
    with pytest.raises(ValueError, match="num_labels must be 1"):
        ScalarRewardModel(hf, ByT5Tokenizer())


def test_dropout_off_by_default_and_on_when_asked():
    # A Llama holds no nn.Dropout: its dropout is the config's attention_dropout, set here to 0.2 to see it cleared.
    m = build_model(config={**TINY_LLAMA, "attention_dropout": 0.2}, tokenizer="byt5")
    assert not any(isinstance(mod, torch.nn.Dropout) for mod in m.modules()) and m.hf.config.attention_dropout == 0.0
    assert build_model(config=TINY_LLAMA, tokenizer="byt5", dropout=0.1).hf.config.attention_dropout == 0.1
    m2 = build_model(name_or_path="minilm", dropout=True)  # the checkpoint's rates: 0.1 (all-MiniLM-L6-v2's config)
    assert {mod.p for mod in m2.modules() if isinstance(mod, torch.nn.Dropout)} == {0.1}
    m3 = build_model(name_or_path="minilm")
    ps = [mod.p for mod in m3.modules() if isinstance(mod, torch.nn.Dropout)]
    assert len(ps) > 10 and set(ps) == {0.0} and m3.hf.config.hidden_dropout_prob == 0.0
    assert m3.pooling == "first" and m.pooling == "last"


def test_trust_remote_code_off_by_default():
    import inspect

    assert inspect.signature(build_model).parameters["trust_remote_code"].default is False


@pytest.mark.parametrize("backbone", ["tiny_llama", "minilm"])
def test_export_loads_in_plain_transformers_with_same_rewards(backbone, request, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = request.getfixturevalue(backbone)
    with torch.no_grad():  # move the head off its init so the test sees trained-like weights
        model.head.weight.add_(0.1)
    groups = _groups(model)
    ours = _rewards(model, groups, model.tokenizer.pad_token_id, "right")
    out = model.save_pretrained(tmp_path / "export", extra={"reward_mean": 0.0})
    assert (out / "model.safetensors").exists()
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    b = collate(groups, tok.pad_token_id, "right")
    with torch.no_grad():
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert hf.config.rmlab["pooling"] == model.pooling


def test_pretrained_model_starts_in_train_mode():
    m = build_model(name_or_path="minilm", dropout=True)
    assert all(mod.training for mod in m.modules())


ENCODERS = {
    "bert": {}, "roberta": {}, "electra": {"embedding_size": 32}, "albert": {"embedding_size": 16},
    "distilbert": {"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64}, "deberta-v2": {},
}


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_every_listed_encoder_matches_plain_transformers_under_left_padding(model_type):
    """The encoder path runs the architecture's own head (DistilBERT's pre-classifier, ALBERT's pooler
    activation, DeBERTa's context pooler) on [CLS], whatever the padding side."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertTokenizer

    vocab = ROOT_VOCAB
    cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=128, vocab_size=len(vocab), pad_token_id=0)
    cfg.update(ENCODERS[model_type])
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, num_labels=1, **cfg)).eval()
    tok = BertTokenizer(vocab_file=str(VOCAB_FILE))
    model = ScalarRewardModel(hf, tok)
    assert model.pooling == "first"
    rows = [tok("a b c d")["input_ids"], tok("a b")["input_ids"], tok("d c b a a b")["input_ids"]]
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])  # left padding
    mask = (torch.arange(n)[None, :] >= torch.tensor([n - len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = torch.cat([hf(input_ids=torch.tensor([r])).logits.reshape(-1) for r in rows])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


ROOT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d"]


@pytest.fixture(scope="module", autouse=True)
def _vocab_file(tmp_path_factory):
    global VOCAB_FILE
    VOCAB_FILE = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    VOCAB_FILE.write_text("\n".join(ROOT_VOCAB) + "\n")


def test_a_misspelled_model_key_is_an_error_that_lists_the_valid_ones():
    from tests.conftest import TINY_LLAMA

    with pytest.raises(ValueError, match=r"model\.forward_mod for a scalar reward model; valid keys: .*forward_mode"):
        build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mod="packed")
    # a key of another head is not silently accepted either
    with pytest.raises(ValueError, match=r"model\.template for a scalar"):
        build_model(config=TINY_LLAMA, tokenizer="byt5", template="{prompt} {response}")
    with pytest.raises(ValueError, match=r"model\.lora for a verifier"):
        build_model("verifier", config=TINY_LLAMA, tokenizer="byt5", lora={"r": 8})
