"""CLoud, critique-out-loud reward models (Ankner et al. 2024): a causal LM that writes a critique of the response,
then a scalar reward head reads the position right after it (``model=cloud``).

One backbone, two heads: the LM head (the causal LM's own, trained on critiques) and ``reward_head``, a
``Linear(hidden, 1)`` on the hidden state at the eos that ends ``prompt + response + cue + critique``. Training,
generation at scoring time, the cache and self-consistency live in rmlab.models.reasoning; the loss that trains
both heads is rmlab.losses.critique (``loss=cloud``); the paper's two stages are rmlab.stages.

Export: the causal LM as plain transformers saves it (``AutoModelForCausalLM`` loads it), the reward head beside it
in ``rmlab_reward_head.safetensors``, and ``config.rmlab`` with the cue, ``max_critique_tokens`` and the generation
settings. docs/heads.md has the plain-transformers recipe; tests/test_cloud.py checks it gives rmlab's reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rmlab.data.templates import CRITIQUE_CUE, ReasoningTemplate
from rmlab.models.backbone import load_backbone
from rmlab.models.base import RewardModel, rows_at
from rmlab.models.builder import register_head
from rmlab.models.reasoning import ReasoningMixin

REWARD_HEAD_FILE = "rmlab_reward_head.safetensors"


class CloudRewardModel(ReasoningMixin, RewardModel):
    """A causal LM with its LM head and a scalar reward head; ``score_heads`` -> rewards [N] and the critique
    loss's parts (see rmlab.models.reasoning)."""

    kind = "cloud"

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any,
        cue: str = CRITIQUE_CUE,
        max_critique_tokens: int = 64,
        generation: dict | None = None,
    ):
        super().__init__(hf_model, tokenizer)
        self.lm_head = hf_model.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(f"{type(hf_model).__name__} has no LM head; CLoud needs a causal LM (AutoModelForCausalLM)")
        self.reward_head = nn.Linear(hf_model.config.hidden_size, 1)
        nn.init.normal_(self.reward_head.weight, std=1.0 / hf_model.config.hidden_size**0.5)
        nn.init.zeros_(self.reward_head.bias)
        self.cue, self.max_critique_tokens = cue, int(max_critique_tokens)
        self.group_template = ReasoningTemplate("cloud", cue, max_tokens=self.max_critique_tokens, tokenizer=tokenizer)
        self.setup_reasoning([], 0, generation, self.max_critique_tokens)

    def read(self, h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The reward head at each row's last real token: the eos right after the critique."""
        x = rows_at(h, last)
        return self.reward_head(x.to(self.reward_head.weight.dtype)).reshape(-1).float()

    def combine(self, rewards: torch.Tensor) -> torch.Tensor:
        """k critiques' rewards [k, N] -> their mean (the paper's self-consistency for CLoud)."""
        return rewards.mean(0)

    def head_report(self, scored) -> dict[str, float]:
        return self.generation_report(scored)

    def backbone_replaced(self) -> None:
        self.lm_head = self.hf.get_output_embeddings()

    def export_meta(self) -> dict[str, Any]:
        return {
            "head": self.kind,
            "cue": self.cue,
            "max_critique_tokens": self.max_critique_tokens,
            "generation": self.generation_meta(),
            "read_with": (
                f"AutoModelForCausalLM + {REWARD_HEAD_FILE} (weight [1, hidden], bias [1]): generate the critique after "
                "tokenizer(prompt + response + cue) up to eos (generation settings here), then the reward is "
                "weight @ h + bias with h = model.model(row).last_hidden_state at the row's last token, the row being "
                "tokenizer(prompt + response + cue + critique) + eos"
            ),
        }

    def save_extra(self, out: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in self.reward_head.state_dict().items()}, str(out / REWARD_HEAD_FILE))

    def load_reward_head(self, name_or_path: str | None) -> None:
        f = Path(name_or_path) / REWARD_HEAD_FILE if name_or_path else None
        if f is not None and f.exists():
            self.reward_head.load_state_dict(load_file(str(f)))


@register_head("cloud", ("cue", "max_critique_tokens", "generation"))
def build(head: str, tok: Any, backbone: dict[str, Any], options: dict[str, Any]) -> CloudRewardModel:
    """model=cloud: a causal LM + reward head. From an rmlab CLoud export, its cue, critique length, generation
    settings and reward head come back unless the config names them."""
    hf = load_backbone("causal", tok, **backbone)
    meta = getattr(hf.config, "rmlab", None) or {}
    saved = meta if isinstance(meta, dict) and meta.get("head") == "cloud" else {}
    gen = {**(saved.get("generation") or {}), **(options.get("generation") or {})}
    model = CloudRewardModel(
        hf,
        tok,
        cue=options.get("cue") or saved.get("cue") or CRITIQUE_CUE,
        max_critique_tokens=options.get("max_critique_tokens") or saved.get("max_critique_tokens") or 64,
        generation=gen,
    )
    if saved:
        model.load_reward_head(backbone["name_or_path"])
    return model
