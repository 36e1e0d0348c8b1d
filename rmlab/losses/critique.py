"""The loss of a model that writes before it scores (CLoud, reasoning judges): critique LM loss + a reward loss."""

from __future__ import annotations

import torch

from rmlab.losses.base import LossOutput, RewardLoss, check_rewards
from rmlab.losses.pairwise import BTLoss


class CritiqueLoss(RewardLoss):
    """Critique language modelling plus any reward loss on the reward read after the critique (Ankner et al.
    2024, "Critique-out-Loud Reward Models", eq for L_CLoud; Zhang et al. 2024 for the rationale SFT of a verifier):

        L = lm_weight * sum_rows NLL(critique tokens) / sum_rows (critique tokens)  +  reward_weight * L_reward(r)

    The NLL is the per-token mean over every critique token of the batch (teacher-forced; the model computes the
    per-row sums, ``heads["critique_nll"]`` and ``heads["critique_tokens"]``, rmlab.models.reasoning). ``r`` is
    the reward read after the critique and ``L_reward`` any other loss (``reward_loss``: BT by default,
    regression, margin, ...). ``reward_active`` is False during stage 1 of the CLoud recipe (critique SFT only,
    rmlab.stages): the reward term is then reported, not trained.
    """

    needs_heads = True

    def __init__(self, reward_loss: RewardLoss | None = None, lm_weight: float = 1.0, reward_weight: float = 1.0):
        super().__init__()
        if lm_weight < 0 or reward_weight < 0:
            raise ValueError(f"lm_weight and reward_weight must be >= 0, got {lm_weight} and {reward_weight}")
        if isinstance(reward_loss, CritiqueLoss) or (reward_loss is not None and reward_loss.needs_heads):
            raise ValueError("loss.reward_loss must be a reward loss on rewards alone (bt, margin, regression, ...)")
        self.reward_loss = reward_loss if reward_loss is not None else BTLoss()
        self.lm_weight, self.reward_weight = float(lm_weight), float(reward_weight)
        self.reward_active = True

    def forward(self, rewards: torch.Tensor, batch, heads: dict | None = None) -> LossOutput:
        if heads is None or "critique_nll" not in heads:
            raise ValueError(
                "the critique loss needs a model that writes critiques (model=cloud, or a verifier/judge with "
                "model.reasoning=true)"
            )
        check_rewards(rewards, batch)
        nll, count = heads["critique_nll"], heads["critique_tokens"]
        lm = nll.sum() / count.sum().clamp_min(1)
        r = self.reward_loss(rewards, batch)
        reward_loss, terms = r.loss, r.terms
        w = self.reward_weight if self.reward_active else 0.0
        loss = self.lm_weight * lm + w * reward_loss
        return LossOutput(loss, terms, {"critique_lm": lm.detach(), "reward_loss": reward_loss.detach()})
