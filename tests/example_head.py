"""A new head type in one file: the reward is a linear head on the mean of the response's hidden states."""

from __future__ import annotations

from typing import Any

import torch

from rmlab.models.backbone import load_backbone
from rmlab.models.base import RewardModel, backbone_states, pool_index
from rmlab.models.builder import register_head


class MeanPoolRewardModel(RewardModel):
    kind = "mean_pool"  # what the export's config.rmlab.head records, so load_export finds this head again

    def score_batch(self, batch) -> torch.Tensor:
        h = backbone_states(self.hf, batch.input_ids, batch.attention_mask, batch.position_ids)  # [N, L, H]
        pos = torch.arange(h.shape[1], device=h.device)
        start = pool_index(batch.attention_mask, "first") + batch.prompt_len  # first response token of each row
        response = (batch.attention_mask.bool() & (pos[None, :] >= start[:, None])).to(h.dtype)[..., None]
        mean = (h * response).sum(1) / response.sum(1).clamp_min(1)
        return self.hf.score(mean).reshape(-1).float()  # a causal LM's one-output `score` head


@register_head("mean_pool")  # model.head=mean_pool; options=(...) would list keys of its own
def build(head: str, tok: Any, backbone: dict[str, Any], options: dict[str, Any]) -> MeanPoolRewardModel:
    return MeanPoolRewardModel(load_backbone("seq_cls", tok, head_name=head, **backbone), tok)
