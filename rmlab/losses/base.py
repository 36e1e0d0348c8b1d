"""Base class for preference losses: rewards + comparison structure -> scalar (+ per-comparison terms).

A loss knows nothing of Lightning or tokenizers. It reads, from any object with these tensors
(``RewardBatch`` has them; ``Comparisons`` below is the minimal one for tests):

- ``winner``, ``loser`` [C]: row indices into ``rewards``;
- ``margin`` [C] (NaN = none), ``strength`` [C] (-1 = none), ``weight`` [C], ``tie`` [C] (bool),
  ``group_weight`` [C] (1 / C(K,2) of the comparison's prompt), ``cmp_group`` [C];
- ``group_index`` [N], ``rank`` [N] (0 = best, NaN = unranked), ``score`` [N] for K-wise / pointwise
  losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar
    terms: torch.Tensor  # [C] per-comparison terms (before weighting), for logging


@dataclass
class Comparisons:
    """The comparison structure alone, for using a loss outside a RewardBatch."""

    winner: torch.Tensor
    loser: torch.Tensor
    margin: torch.Tensor | None = None
    strength: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    tie: torch.Tensor | None = None
    group_weight: torch.Tensor | None = None
    cmp_group: torch.Tensor | None = None
    group_index: torch.Tensor | None = None
    rank: torch.Tensor | None = None
    score: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        c = self.winner.numel()
        f = torch.get_default_dtype()
        if self.margin is None:
            self.margin = torch.full((c,), float("nan"), dtype=f)
        if self.strength is None:
            self.strength = torch.full((c,), -1, dtype=torch.long)
        if self.weight is None:
            self.weight = torch.ones(c, dtype=f)
        if self.tie is None:
            self.tie = torch.zeros(c, dtype=torch.bool)
        if self.group_weight is None:
            self.group_weight = torch.ones(c, dtype=f)
        if self.cmp_group is None:
            self.cmp_group = torch.zeros(c, dtype=torch.long)


def check_rewards(rewards: torch.Tensor, batch) -> None:
    """Shapes are asserted: a [N,1] reward against [C] indices is the classic silent broadcast bug."""
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D [N] (one per response), got shape {tuple(rewards.shape)}; "
            "squeeze the head output with .reshape(-1) (a [B,1] - [B] difference broadcasts to [B,B])"
        )
    w, lo = batch.winner, batch.loser
    if w.shape != lo.shape or w.dim() != 1:
        raise ValueError(f"winner and loser must be 1-D and equal in shape, got {tuple(w.shape)} and {tuple(lo.shape)}")
    if w.numel() and int(max(w.max(), lo.max())) >= rewards.numel():
        raise ValueError(f"a comparison indexes response {int(max(w.max(), lo.max()))} but there are {rewards.numel()} rewards")


def tie_term(d: torch.Tensor) -> torch.Tensor:
    """BT with target 1/2: -0.5 log s(d) - 0.5 log s(-d). Minimized at d = 0."""
    return -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))


class PairwiseLoss(nn.Module):
    """A loss that is a (weighted) mean of per-comparison terms f(d), d = r_w - r_l.

    balance: ``none`` weighs every comparison alike; ``group`` is InstructGPT's eq 6: each comparison
        gets 1/C(K,2) of its prompt, so every prompt weighs the same whatever its K.
    ties: a tie comparison is trained toward equal rewards with BT at target 1/2 (``tie_term``).
    """

    def __init__(self, balance: str = "none"):
        super().__init__()
        if balance not in ("none", "group"):
            raise ValueError(f"balance must be none|group, got {balance!r}")
        self.balance = balance

    def pair_term(self, d: torch.Tensor, batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def tie_term(self, d: torch.Tensor, batch) -> torch.Tensor:
        return tie_term(d)

    def comparison_weights(self, batch) -> torch.Tensor:
        w = batch.weight
        return w * batch.group_weight if self.balance == "group" else w

    def forward(self, rewards: torch.Tensor, batch) -> LossOutput:
        check_rewards(rewards, batch)
        d = rewards[batch.winner] - rewards[batch.loser]
        terms = self.pair_term(d, batch)
        if batch.tie.any():
            terms = torch.where(batch.tie, self.tie_term(d, batch), terms)
        if terms.shape != d.shape:
            raise ValueError(f"per-comparison terms have shape {tuple(terms.shape)}, expected {tuple(d.shape)}")
        w = self.comparison_weights(batch).to(terms.dtype)
        return LossOutput(loss=(w * terms).sum() / w.sum().clamp_min(1e-12), terms=terms.detach())
