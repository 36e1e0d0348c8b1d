"""ODIN's length-disentangled reward model (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in
RLHF", ICML 2024): ``model.head=odin``.

Two linear heads read the same features (the pooled hidden state, after an encoder's pooler):

- the **quality head** is the backbone's own one-output classification head (``score`` / ``classifier``);
- the **length head** is a second linear layer beside it, ``r_L = w_L . h``.

Training (``rmlab.losses.odin.OdinLoss``) fits the preference loss on ``r_Q + r_L``, pulls ``r_L`` towards the
response length and pushes ``r_Q`` away from it, with the two weight vectors kept orthogonal. The **reward is the
quality head alone**: ``score_batch`` (validation, ``eval.py``, ``rmlab.score``) returns ``r_Q``, and the export is
the backbone with the quality head, a plain ``AutoModelForSequenceClassification`` with ``num_labels=1`` whose
output is ``r_Q``. The length head is saved beside it (``rmlab_length_head.safetensors``, read by
``rmlab.models.load_export``, never by transformers) and ``config.rmlab`` says how the export was made.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rmlab.metrics import pearson
from rmlab.models.backbone import load_backbone
from rmlab.models.base import RewardModel
from rmlab.models.builder import SEQUENCE_HEAD_OPTIONS, register_head
from rmlab.models.lora import apply_lora
from rmlab.models.packing import configure_speed, packed_hidden
from rmlab.models.scalar import ScalarRewardModel

LENGTH_HEAD_FILE = "rmlab_length_head.safetensors"
MADE_BY = (
    "ODIN (Chen et al. 2024): trained with two linear heads on the same features, the preference loss on their sum, "
    "the length head correlated with response length and the quality head decorrelated from it, their weights "
    "orthogonal. This export's classification head is the quality head alone: its output is the reward. The length "
    "head is in " + LENGTH_HEAD_FILE + " (rmlab only) and is not part of the reward."
)


class OdinRewardModel(ScalarRewardModel):
    """The scalar head plus a length head. ``score_batch`` -> r_Q [N]; ``score_heads`` -> (r_Q, {"quality": r_Q,
    "length": r_L, "quality_weight": w_Q, "length_weight": w_L}), the weights [N, H] as views of one row each (every
    extra output is per row), so the loss can keep them orthogonal."""

    kind = "odin"
    extra_outputs = ("quality", "length", "quality_weight", "length_weight")

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, pooling: str = "auto"):
        super().__init__(hf_model, tokenizer, pooling)
        inner = getattr(self.head, "original_module", self.head)
        if not isinstance(inner, nn.Linear):
            raise ValueError(
                f"model.head=odin needs a backbone whose reward head is one linear layer (Llama's score, BERT's "
                f"classifier); {type(hf_model).__name__}'s is {type(inner).__name__}"
            )
        self.length_head = nn.Linear(inner.in_features, 1, bias=False)
        std = float(getattr(hf_model.config, "initializer_range", 0.02))
        nn.init.normal_(self.length_head.weight, std=std)

    # The scalar head's LM path (loss=grm) is not wired into the two-head forward: refuse it, named.
    require_outputs = RewardModel.require_outputs

    def pooled(self, batch) -> torch.Tensor:
        """Pooled hidden states [N, H] in the model's forward mode."""
        if self.forward_mode == "padded":
            h = self.padded_pooled(batch)  # the scalar head's sync-free padded path, where it applies
            if h is None:
                h = self.hidden_at_pool(batch.input_ids, batch.attention_mask, batch.position_ids)
            return h
        return packed_hidden(self, batch)

    def score_heads(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.head_features(self.pooled(batch))
        q = self.head(feats).reshape(-1).float()
        length = self.length_head(feats.to(self.length_head.weight.dtype)).reshape(-1).float()
        n = q.shape[0]
        w_q = getattr(self.head, "original_module", self.head).weight.reshape(1, -1)
        heads = {
            "quality": q,
            "length": length,
            "quality_weight": w_q.float().expand(n, -1),
            "length_weight": self.length_head.weight.reshape(1, -1).float().expand(n, -1),
        }
        return q, heads

    def head_report(self, scored: Iterable) -> dict[str, float]:
        """Pearson correlation of each head (and their sum) with the response length, and of the reward (the
        quality head) with the true reward where the data has it, over already scored batches."""
        q, ln, lens, true_r = [], [], [], []
        for s in scored:
            q.append(s.heads["quality"])
            ln.append(s.heads["length"])
            lens.append(s.batch.response_len.cpu().float())
            true_r.append(s.batch.true_reward.cpu().float())
        if not q:
            return {}
        q, ln, lens, true_r = torch.cat(q), torch.cat(ln), torch.cat(lens), torch.cat(true_r)
        return {
            "length_corr/quality": pearson(q, lens, min_n=3),
            "length_corr/length": pearson(ln, lens, min_n=3),
            "length_corr/sum": pearson(q + ln, lens, min_n=3),
            "reward_true_corr": pearson(q, true_r, min_n=3),
        }

    def export_meta(self) -> dict[str, Any]:
        return {
            **super().export_meta(),
            "read_with": "AutoModelForSequenceClassification: the reward is logits[:, 0] (the quality head) of the row "
            "config.rmlab.scoring describes; the length head is not part of it",
            "reward": "quality_head",
            "made_by": MADE_BY,
            "length_head_file": LENGTH_HEAD_FILE,
        }

    def save_extra(self, out: Path) -> None:
        save_file({"weight": self.length_head.weight.detach().contiguous()}, str(out / LENGTH_HEAD_FILE))

    def load_length_head(self, name_or_path: str | None) -> None:
        """The length head's weights from an rmlab ODIN export, when the directory has them."""
        f = Path(name_or_path) / LENGTH_HEAD_FILE if name_or_path else None
        if f is not None and f.exists():
            self.length_head.load_state_dict(load_file(str(f)))


@register_head("odin", SEQUENCE_HEAD_OPTIONS)  # model.head=odin on any scalar model, or model=odin
def build(head: str, tok: Any, backbone: dict[str, Any], options: dict[str, Any]) -> OdinRewardModel:
    hf = load_backbone("seq_cls", tok, num_labels=1, head_name=head, **backbone)
    lora = options.get("lora")
    if lora and int(lora.get("r") or 0) > 0:  # adapters + the quality head; the length head lives outside hf, trained
        apply_lora(hf, **lora)
    pooling = options.get("pooling") or "auto"
    meta = getattr(hf.config, "rmlab", None)
    if isinstance(meta, dict) and pooling == "auto":
        pooling = meta.get("pooling", "auto")
    model = OdinRewardModel(hf, tok, pooling)
    model.load_length_head(backbone["name_or_path"])
    return configure_speed(
        model,
        options.get("forward_mode") or "padded",
        options.get("row_tokens"),
        bool(options.get("compile") or False),
        options.get("attention") or "auto",
        options.get("last_layer_at_reads", True) is not False,
    )
