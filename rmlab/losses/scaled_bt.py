"""HelpSteer2-Preference's Scaled Bradley-Terry (Wang et al. 2024, "HelpSteer2-Preference: Complementing Ratings
with Preferences", section 3): each pair's BT loss multiplied by the magnitude of its preference,

    L = mean_c  m_c * -log sigmoid(r_w - r_l),      m_c in {1, 2, 3} for slightly better / better / much better

which the paper motivates as repeating a pair m times. No other rmlab option gives this: ``loss=bt``'s
per-comparison ``weight`` normalises by the sum of the weights (and no format reads a weight column), and
``loss=margin source=strength`` shifts the logit by a margin instead of scaling the loss.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rmlab.losses.base import PairwiseLoss, tie_term

MAGNITUDE_SOURCES = ("strength", "margin", "rating")


class ScaledBTLoss(PairwiseLoss):
    """Scaled BT: ``m * -log sigmoid(d)`` per comparison, averaged over comparisons (the paper's formula), each
    also multiplied by its ``weight`` (and by 1/C(K,2) with ``balance=group``), the average then taken over those.

    magnitude: where m comes from. ``strength``: the 0..3 strength level itself (HelpSteer2-Preference's |score| on
        its -3..3 scale maps to data.fields.strength; 0, negligibly better, gives the pair no weight); ``margin``:
        |margin field|; ``rating``: the rating gap ``max(0, score_w - score_l)``.
    default: m where the comparison has none (strength -1, NaN margin or rating); 1 = plain BT for that pair.
    A tie keeps the BT tie term, times its own m.
    """

    def __init__(self, magnitude: str = "strength", default: float = 1.0, balance: str = "none",
                 center_coef: float = 0.0, center: str = "pair"):
        super().__init__(balance, center_coef, center)
        if magnitude not in MAGNITUDE_SOURCES:
            raise ValueError(f"magnitude must be one of {MAGNITUDE_SOURCES}, got {magnitude!r}")
        if default < 0:
            raise ValueError(f"default magnitude must be >= 0, got {default}")
        self.magnitude, self.default = magnitude, float(default)

    def magnitudes(self, batch, like: torch.Tensor) -> torch.Tensor:
        """m [C] in the dtype of ``like``."""
        if self.magnitude == "strength":
            s = batch.strength
            m = torch.where(s >= 0, s.to(like.dtype), torch.full_like(like, self.default))
        elif self.magnitude == "margin":
            m = batch.margin.to(like).abs()
        else:
            if batch.score is None:
                raise ValueError("magnitude `rating` needs per-response ratings in batch.score")
            sc = batch.score.to(like)
            m = (sc[batch.winner] - sc[batch.loser]).clamp_min(0.0)
        return torch.nan_to_num(m, nan=self.default)

    def pair_term(self, d, batch):
        return self.magnitudes(batch, d) * -F.logsigmoid(d)

    def tie_term(self, d, batch):
        return self.magnitudes(batch, d) * tie_term(d)
