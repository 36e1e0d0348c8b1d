"""GRM's hidden-state regularisation (Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable
Reward Model for LLMs", NeurIPS 2024): a language-modelling loss on the chosen response through the shared backbone.

    L = (1 - alpha) * L_pref(r)  +  alpha * L_sft,     L_sft = mean_c -log sigmoid(beta * log pi(y_w(c) | x))

with ``log pi(y | x)`` the backbone's log-probability of the response tokens, summed (the model's
``response_logp``, through its LM head: rmlab.models.scalar ``enable_lm``), over the winners of the batch's non-tie
comparisons. ``form=logsigmoid`` is the paper's SFT regulariser (its eq. for L_SFT, the DPO form without the
rejected response and the reference model; alpha = 0.01 and beta = 0.1 are its defaults); ``form=nll`` is plain
supervised fine-tuning, ``-log pi(y_w | x)`` (the repository's ``no_logsigmoid_sft`` variant). Causal LMs only.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rmlab.losses.base import LossOutput, RewardLoss, check_rewards
from rmlab.losses.pairwise import BTLoss

FORMS = ("logsigmoid", "nll")


class GRMLoss(RewardLoss):
    """Any preference loss (``base``) plus GRM's text-generation regulariser on the chosen responses.

    base: the preference loss (BT by default); alpha: the regulariser's share, ``(1 - alpha) L_pref + alpha L_sft``;
    beta: the scale inside the log-sigmoid; form: ``logsigmoid`` (the paper) or ``nll``.
    """

    needs_heads = True

    def __init__(self, base: RewardLoss | None = None, alpha: float = 0.01, beta: float = 0.1, form: str = "logsigmoid"):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the regulariser's share), got {alpha}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.base = base if base is not None else BTLoss()
        self.alpha, self.beta, self.form = float(alpha), float(beta), form
        self.required_outputs = ("response_logp", *self.base.required_outputs)

    def sft_terms(self, logp: torch.Tensor) -> torch.Tensor:
        """Per chosen response: -log sigmoid(beta * log pi) or -log pi."""
        return -F.logsigmoid(self.beta * logp) if self.form == "logsigmoid" else -logp

    def forward(self, rewards: torch.Tensor, batch, heads: dict[str, torch.Tensor] | None = None) -> LossOutput:
        if heads is None or "response_logp" not in heads:
            raise ValueError("loss=grm reads the model's response log-probabilities: the module turns them on "
                             "(model.require_outputs); a causal LM with the scalar head gives them")
        check_rewards(rewards, batch)
        pref = self.base(rewards, batch, heads=heads) if self.base.needs_heads else self.base(rewards, batch)
        # The mean over non-tie comparisons as a masked sum: no boolean indexing and no branch on the device's
        # values, so a training step reads nothing back. No such comparison: 0, still attached.
        keep = ~batch.tie
        logp = heads["response_logp"][batch.winner]
        if not getattr(batch, "indices_checked", False) and not bool(torch.isfinite(logp[keep]).all()):
            # A collated batch's model scored exactly these rows (rmlab.models.scalar.lm_chosen): checked elsewhere.
            raise ValueError("a winning response has no log-probability: the model scored other rows")
        w = keep.to(logp.dtype)
        sft = (w * self.sft_terms(torch.where(keep, logp, 0.0))).sum() / w.sum().clamp_min(1)
        loss = (1.0 - self.alpha) * pref.loss + self.alpha * sft
        return LossOutput(loss, pref.terms, {**pref.parts, "preference": pref.loss.detach(), "sft": sft.detach()})
