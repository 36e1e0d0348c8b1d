"""ODIN's disentangled objective (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF", ICML 2024).

The model has two linear heads on the same features (``rmlab.models.odin``): a quality head r_Q and a length head
r_L. The loss fits the preference labels with their sum and splits the length signal off into r_L:

    L = L_pref(r_Q + r_L)  -  length_coef * rho(r_L, len)  +  quality_coef * |rho(r_Q, len)|
        +  ortho_coef * |cos(w_Q, w_L)|

- ``L_pref``: any preference loss (``base``, BT by default, the paper's ranking loss) on r = r_Q + r_L;
- ``rho``: Pearson's correlation over the batch's responses with their length in tokens (``batch.response_len``;
  the paper computes it over the global batch, rmlab over each process's batch). ``feature=spurious`` keys the
  second head on a known spurious feature instead (``batch.spurious``: the hackable simulator's flattery count),
  an extension of the paper's idea to the hack a data set is known to carry;
- the orthogonality term keeps the two heads reading different directions of the features. The paper writes it
  as |W_Q^T W_L|; rmlab takes it on the unit-normalised weights (the cosine), so it constrains the directions and
  cannot be met by shrinking a head, which the two correlation terms (scale-free) would not notice.

Only r_Q is the reward (validation, evaluation, the export); r_L absorbs what the labels reward in length.
"""

from __future__ import annotations

import torch

from rmlab.losses.base import LossOutput, RewardLoss, check_rewards
from rmlab.losses.pairwise import BTLoss


def batch_pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson's correlation of two [N] tensors, differentiable in both; 0 when either has no spread (a batch of
    equal lengths, or a head that outputs a constant), where the correlation is undefined."""
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"correlation needs two [N] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() < 2:
        return x.sum() * 0.0
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum() + eps)


FEATURES = ("length", "spurious")


class OdinLoss(RewardLoss):
    """ODIN's loss (see the module docstring): preference loss on r_Q + r_L, the length head correlated with the
    response length, the quality head decorrelated from it, the head weights orthogonal.

    base: the preference loss applied to the sum (BTLoss by default; any pairwise or ranking loss).
    length_coef, quality_coef, ortho_coef: weights of -rho(r_L, len), |rho(r_Q, len)| and |cos(w_Q, w_L)|
        (1, 1, 1 as in the paper's released recipe; 0 turns a term off).
    Needs ``model.head=odin`` (``heads``: quality, length and the two weight vectors).
    """

    needs_heads = True
    required_outputs = ("quality", "length", "quality_weight", "length_weight")

    def __init__(
        self,
        base: RewardLoss | None = None,
        length_coef: float = 1.0,
        quality_coef: float = 1.0,
        ortho_coef: float = 1.0,
        feature: str = "length",
    ):
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"ODIN's feature must be one of {FEATURES}, got {feature!r}")
        self.feature = feature
        for name, v in (("length_coef", length_coef), ("quality_coef", quality_coef), ("ortho_coef", ortho_coef)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if base is not None and base.needs_heads:
            raise ValueError(f"ODIN's preference term takes a loss on rewards alone, not {type(base).__name__}")
        self.base = base if base is not None else BTLoss()
        self.length_coef, self.quality_coef, self.ortho_coef = float(length_coef), float(quality_coef), float(ortho_coef)

    def forward(self, rewards: torch.Tensor, batch, heads: dict[str, torch.Tensor] | None = None) -> LossOutput:
        if heads is None or any(k not in heads for k in self.required_outputs):
            raise ValueError("the ODIN loss reads a quality and a length head: use model.head=odin (rmlab.models.odin)")
        check_rewards(rewards, batch)
        q, ln = heads["quality"], heads["length"]
        if not getattr(batch, "host_checked", False):
            self.check_values(batch)
        lens = (batch.response_len if self.feature == "length" else batch.spurious).to(q.dtype)
        pref = self.base(q + ln, batch)
        rho_len = batch_pearson(ln, lens)
        rho_q = batch_pearson(q, lens)
        w_q, w_l = heads["quality_weight"][0], heads["length_weight"][0]
        cos = (w_q * w_l).sum() / (w_q.norm() * w_l.norm()).clamp_min(1e-12)
        loss = pref.loss - self.length_coef * rho_len + self.quality_coef * rho_q.abs() + self.ortho_coef * cos.abs()
        parts = {
            "preference": pref.loss.detach(),
            "rho_length_head": rho_len.detach(),
            "rho_quality_head": rho_q.detach(),
            "head_cosine": cos.detach(),
        }
        return LossOutput(loss, pref.terms, parts)

    def check_values(self, batch) -> None:
        """The feature the second head is pulled towards must be there for every response (read on the host copy of
        the batch before it goes to the device, or here for a batch that was not checked there)."""
        if self.feature == "length":
            if getattr(batch, "response_len", None) is None:
                raise ValueError("the ODIN loss needs batch.response_len (response tokens per row; rmlab's collator sets it)")
            return
        f = getattr(batch, "spurious", None)
        if f is None or bool(torch.isnan(f).any()):
            raise ValueError(
                "loss.feature=spurious needs a known spurious feature for every response (batch.spurious): the hackable "
                "simulator gives its flattery count when data.simulator.hack_rate > 0; other data have none, so use "
                "loss.feature=length"
            )
