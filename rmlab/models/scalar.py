"""The scalar reward model: a Hugging Face backbone with a one-output head, pooled by the attention mask.

The reward of a row is the head applied to one token found through the attention mask, never
through ``pad_token_id`` (which picks the wrong token when pad == eos or under left padding):

- causal LMs read the **last real token** (the end of the response, usually <eos>);
- encoders with a [CLS] pooler (BERT, RoBERTa, MiniLM) read the **first real token** ([CLS]), where
  their classification head and pretrained pooler are trained to look. This also keeps the exported
  model equal to plain ``AutoModelForSequenceClassification``.

Position ids are computed from the mask, so left padding does not shift positions. Causal LMs can also
run packed or prefix-shared (rmlab.models.packing): every unique token forwarded once, same rewards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rmlab.models.base import ENCODER_TYPES, RewardModel, backbone_states, pool_index, rows_at
from rmlab.models.packing import packed_hidden


class ScalarRewardModel(RewardModel):
    """Backbone + scalar head. ``forward`` returns one reward per row, shape [N]."""

    kind = "scalar"
    # Set by build_model (configure_speed); a bare model stays padded.
    forward_mode: str = "padded"
    row_tokens: int | None = None

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, pooling: str = "auto", num_outputs: int = 1):
        super().__init__(hf_model, tokenizer)
        # num_outputs > 1 only for multi-output heads (rmlab.models.attributes), which combine them into one reward.
        self.num_outputs = num_outputs
        n = getattr(hf_model.config, "num_labels", 1)
        if n != num_outputs:
            raise ValueError(
                f"a reward model has a scalar head: num_labels must be {num_outputs}, got {n}. "
                "Load the backbone with num_labels=1 (rmlab does) or drop the classifier's extra outputs."
            )
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
        inner = getattr(head, "original_module", head)  # under LoRA the head is wrapped by peft (rmlab.models.lora)
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

    def backbone_replaced(self) -> None:
        # The head module object changed (LoRA merge): point at the new one.
        self.head, self.head_wants_seq, self.pre_head = self._find_head()

    def hidden_at_pool(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        h = backbone_states(self.hf, input_ids, attention_mask, position_ids)
        return rows_at(h, pool_index(attention_mask, self.pooling))

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

    def score_batch(self, batch) -> torch.Tensor:
        """Rewards [N] for a RewardBatch in ``self.forward_mode`` (padded | packed | prefix_shared).

        All modes give the same rewards (tests/test_packing.py); packed and prefix_shared forward each
        unique token once instead of padding every row to the longest (see rmlab/models/packing.py).
        """
        if self.forward_mode == "padded":
            return self(batch.input_ids, batch.attention_mask, batch.position_ids)
        return self.reward_from_hidden(packed_hidden(self, batch))

    def export_meta(self) -> dict[str, Any]:
        return {
            "head": self.kind,
            "pooling": self.pooling,
            "read_with": "AutoModelForSequenceClassification: the reward is logits[:, 0] of the row config.rmlab.scoring "
            "describes",
        }

