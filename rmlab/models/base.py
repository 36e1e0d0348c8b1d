"""The one interface every reward model implements, and the pieces every model shares.

A reward model turns a ``RewardBatch`` (rmlab.data.collate) into one reward per row. Every caller (the
LightningModule, ``eval.py``, ``rmlab.score``, the export) talks to a model through ``RewardModel`` only:

- ``kind``: ``scalar`` | ``attributes`` | ``verifier`` | ``judge`` (what the export's config records);
- ``tokenizer``: the tokenizer the data module tokenizes with;
- ``group_template``: None, or the row builder the data module applies to each text group before
  tokenization (generative models read a judge template, rmlab.data.templates);
- ``extra_outputs``: names of the per-row outputs ``score_heads`` returns beside the rewards (the
  attribute head: ``attributes`` and ``weights``); empty for a model with one output;
- ``batch_layout``: None, or the packed layout the collator builds for the model's forward
  (rmlab.data.layout.LayoutSpec; the data module passes it to its collator);
- ``output_names``: names of the per-row outputs a scored file reports (the attribute names);
- ``score_batch(batch) -> [N]`` and ``score_heads(batch) -> ([N], {name: [N, ...]})``;
- ``require_outputs(names)``: turn on (or refuse, named) the extra outputs a loss reads, once before training;
- ``head_report(scored) -> {name: float}``: the model's own diagnostics (judge position bias, attribute
  correlations) over already scored batches (``rmlab.models.scoring``), so reporting costs no second forward;
- ``save_pretrained(dir, extra)``: a Hugging Face directory that plain transformers loads, with
  ``config.rmlab`` holding what rmlab needs to rebuild the same scorer.

A new head type is one file in this package (a subclass) plus one yaml in ``conf/model/``; see docs/heads.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Bidirectional encoders: the reward is read at [CLS], and a prompt cannot be shared across responses.
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "albert", "deberta", "deberta-v2", "camembert"
}


def pool_index(attention_mask: torch.Tensor, pooling: str, check: bool = True) -> torch.Tensor:
    """Index of the first or last real token of each row, from the mask alone. ``check=False`` skips the test
    that every row has a real token (a read-back): for collated batches, which always do."""
    mask = attention_mask.bool()
    if check and not mask.any(-1).all():
        raise ValueError("a row of the batch has no real token (all padding)")
    if pooling == "first":
        return mask.int().argmax(-1)
    if pooling == "last":
        n = mask.shape[-1]
        return n - 1 - mask.flip(-1).int().argmax(-1)
    raise ValueError(f"pooling must be first|last, got {pooling!r}")


def backbone_states(hf: nn.Module, input_ids, attention_mask, position_ids=None, **kwargs) -> torch.Tensor:
    """Last hidden states [N, L, H] of a transformers model's base, positions from the mask by default
    (so left padding does not shift them). ``kwargs`` go to the base model (``use_cache=False`` for a
    causal LM: no KV cache is filled during a training forward)."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def rows_at(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """h [N, L, H] at one position per row -> [N, H]."""
    return h[torch.arange(h.shape[0], device=h.device), index]


class RewardModel(nn.Module):
    """Base class of every reward model (see the module docstring for the contract)."""

    kind: str = "scalar"
    group_template: Any = None
    extra_outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    # What the collator prepares for this model's forward (rmlab.data.layout.LayoutSpec), or None: the
    # packed layout is then built in the DataLoader workers, not in the training step.
    batch_layout: Any = None
    # True for a model that writes a critique before it scores (rmlab.models.reasoning): its score_heads also
    # returns the critique LM loss's parts, and scoring in eval mode generates the critique first.
    writes_critiques: bool = False

    def __init__(self, hf_model: nn.Module, tokenizer: Any):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.hf.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The longest row this model takes: its position embeddings and its tokenizer's limit (None = no limit
        known). Scoring published benchmarks, whose rows are longer than training's, starts from it."""
        limits = [getattr(self.config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # tokenizers say 1e30 for none
        return min(limits) if limits else None

    def score_batch(self, batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_heads(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards [N] and the named extra outputs (none for a one-output model)."""
        return self.score_batch(batch), {}

    def prepare_batch(self, batch):
        """Host-side work on a collated training batch before it goes to the device
        (``RewardModule.on_before_batch_transfer``): index tensors whose size depends on the data, which the
        device would otherwise have to report back mid-step. Nothing by default."""
        return batch

    def require_outputs(self, names: Iterable[str]) -> None:
        """Called once before training with the extra outputs the loss reads (``RewardLoss.required_outputs``).
        A model that can compute an optional output turns it on here (the scalar head's ``response_logp``);
        a name the model cannot give is an error naming the model and what to do."""
        missing = [n for n in names if n not in self.extra_outputs]
        if missing:
            have = ", ".join(self.extra_outputs) or "none"
            raise ValueError(
                f"the loss reads the model output(s) {', '.join(missing)}, which a {self.kind} reward model does not "
                f"give (it gives: {have}); pick the model the loss is made for (docs/losses.md names it)"
            )

    def head_report(self, scored: Iterable) -> dict[str, float]:
        """The model's own diagnostics over ``rmlab.models.scoring.Scored`` batches; none by default."""
        return {}

    def backbone_replaced(self) -> None:
        """Called after ``self.hf`` was swapped for another object (the LoRA merge): re-find owned parts."""

    def recorded_scoring(self) -> dict[str, Any]:
        """``config.rmlab.scoring`` of the export this model was loaded from (how its rows were built), else {}."""
        config = getattr(self.hf, "config", None)  # None for a model made of others (an ensemble)
        return dict((getattr(config, "rmlab", None) or {}).get("scoring", {}))

    def export_meta(self) -> dict[str, Any]:
        """What ``config.rmlab`` records so ``rmlab.models.load_export`` rebuilds this scorer."""
        return {"head": self.kind}

    def save_pretrained(self, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        """Hugging Face format (safetensors + tokenizer) that plain transformers loads."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.hf.config
        if self.tokenizer is not None:  # rmlab's pad, never the rows' eos (rmlab.models.backbone.ensure_distinct_pad)
            cfg.pad_token_id = self.tokenizer.pad_token_id
        cfg.rmlab = {**self.export_meta(), **(extra or {})}
        if {"reward_mean", "reward_std"} <= cfg.rmlab.keys():  # OpenRLHF's --normalize_reward reads config.mean / config.std
            cfg.mean, cfg.std = float(cfg.rmlab["reward_mean"]), float(cfg.rmlab["reward_std"])
        self.hf.save_pretrained(out, safe_serialization=True)
        if self.tokenizer is not None:
            # Chat data rendered with rmlab's fallback template (the tokenizer has none): saved as the tokenizer's
            # own, so apply_chat_template downstream renders what training scored.
            template = cfg.rmlab.get("scoring", {}).get("chat_template")
            own = getattr(self.tokenizer, "chat_template", None)
            if template and not own:
                self.tokenizer.chat_template = template
            try:
                self.tokenizer.save_pretrained(out)
            finally:
                if template and not own:
                    self.tokenizer.chat_template = own
        self.save_extra(out)
        return out

    def save_extra(self, out: Path) -> None:
        """Weights that live outside the transformers model (the attribute gate), saved beside it."""
