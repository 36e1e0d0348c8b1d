"""Bradley-Terry and its margin variants (eqs 3-6 of the chapter), and the hinge baseline."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rmlab.losses.base import PairwiseLoss

# Llama 2 (Touvron et al. 2023, Table 28): margin by preference strength on its 4-level scale.
# Index = rmlab strength level: 0 negligibly better/unsure, 1 slightly better, 2 better, 3 significantly better.
LLAMA2_MARGINS = {"large": (0.0, 1.0, 2.0, 3.0), "small": (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)}
MARGIN_SOURCES = ("none", "value", "rating", "strength", "prob")


class MarginSource(nn.Module):
    """Where m(r), the per-comparison margin, comes from. Every source is multiplied by ``scale``.

    - ``none``: m = 0.
    - ``value``: the comparison's own margin field (an explicit margin column, or a rating gap the data
      adapter already computed). NaN = no margin = 0.
    - ``rating``: the gap of the two responses' ratings, ``score[w] - score[l]``, clamped at 0 (a
      winner rated lower gets no margin, not a negative one). Works for 1-5 Likert ratings and for
      continuous judge scores alike. A missing rating gives m = 0.
    - ``strength``: Llama 2's table for its 4-level scale, ``table=large`` (3, 2, 1, 0) or
      ``table=small`` (1, 2/3, 1/3, 0). Strength -1 (none) gives m = 0.
    - ``prob``: the margin field holds a judge's probability p = P(w > l) (AlpacaEval-style); the margin
      is the score gap that p implies under BT, ``logit(p)``, with p clipped to [eps, 1 - eps] so that a
      certain judge gives a finite margin (logit(1 - 1e-3) = 6.9).
    """

    def __init__(self, source: str = "value", table: str = "large", scale: float = 1.0, eps: float = 1e-3):
        super().__init__()
        if source not in MARGIN_SOURCES:
            raise ValueError(f"margin source must be one of {MARGIN_SOURCES}, got {source!r}")
        if table not in LLAMA2_MARGINS:
            raise ValueError(f"margin table must be one of {sorted(LLAMA2_MARGINS)}, got {table!r}")
        self.source, self.table, self.scale, self.eps = source, table, float(scale), float(eps)
        # float64 so that 1/3 is exact in float64 tests; cast to the rewards' dtype on use.
        self.register_buffer("_table", torch.tensor(LLAMA2_MARGINS[table], dtype=torch.float64), persistent=False)

    def check_values(self, batch) -> None:
        """The source's range checks, which read the batch's values: on the host, before the batch goes to the
        device (``RewardLoss.check_batch``), or in ``forward`` for a batch that was not checked there."""
        if self.source == "strength":
            s = batch.strength
            if s.numel() and int(s.max()) > 3:
                raise ValueError(f"strength levels must be 0..3 for the Llama 2 table, got {int(s.max())}")
        elif self.source == "prob":
            m = batch.margin
            if bool(((m < 0) | (m > 1)).any()):
                raise ValueError("margin source `prob` needs probabilities in [0, 1] in the margin field")

    def forward(self, batch, like: torch.Tensor) -> torch.Tensor:
        """Margins [C] in the dtype and device of ``like`` (the reward differences)."""
        if self.source == "none":
            return torch.zeros_like(like)
        if not getattr(batch, "host_checked", False):
            self.check_values(batch)
        if self.source == "strength":
            s = batch.strength
            m = torch.where(s >= 0, self._table.to(like)[s.clamp(0, 3)], torch.zeros_like(like))
        elif self.source == "rating":
            if batch.score is None:
                raise ValueError("margin source `rating` needs per-response ratings in batch.score")
            sc = batch.score.to(like)
            m = torch.nan_to_num(sc[batch.winner] - sc[batch.loser], nan=0.0).clamp_min(0.0)
        else:
            m = batch.margin.to(like)
            if self.source == "prob":
                m = torch.logit(m, eps=self.eps)
            m = torch.nan_to_num(m, nan=0.0)
        return self.scale * m


class BTLoss(PairwiseLoss):
    """Bradley-Terry (eq 3; Bradley & Terry 1952, as in InstructGPT, Ouyang et al. 2022):

        L = -log sigmoid(r_w - r_l)

    computed with ``logsigmoid``, which is stable for any |r_w - r_l|. With ``balance=group`` it is
    InstructGPT's eq 6 (``conf/loss/grouped.yaml``): the mean over prompts of the mean over each
    prompt's C(K,2) comparisons.
    """

    def pair_term(self, d, batch):
        return -F.logsigmoid(d)


class LogExpLoss(PairwiseLoss):
    """The log-exp form of BT (eq 4, in its correct form; the chapter prints a typo):

        L = log(1 + exp(r_l - r_w))

    Computed as ``logaddexp(0, x)`` = log(e^0 + e^x) with x = r_l - r_w, so it neither overflows at
    x = +1e4 nor loses precision at x = -1e4. (The textbook ``max(x, 0) + log1p(exp(-|x|))`` has the
    right value but autograd gives it gradient 1 instead of 1/2 at x = 0, where every pair starts when a
    head outputs equal rewards.) It equals BT in value and gradient; it is here so a sweep can show that.
    """

    def pair_term(self, d, batch):
        x = -d
        return torch.logaddexp(torch.zeros_like(x), x)


class MarginLoss(PairwiseLoss):
    """Llama 2's margin loss (eq 5; Touvron et al. 2023, "Llama 2", section 3.2.2):

        L = -log sigmoid(r_w - r_l - m(r))

    m(r) comes from ``source`` (see ``MarginSource``: value | rating | strength | prob), times
    ``scale``. A comparison with no margin gets m = 0 (plain BT). Ties use the tie term, without margin.
    """

    def __init__(
        self,
        source: str = "value",
        table: str = "large",
        scale: float = 1.0,
        balance: str = "none",
        center_coef: float = 0.0,
        center: str = "pair",
    ):
        super().__init__(balance, center_coef, center)
        self.margin_source = MarginSource(source, table, scale)

    @property
    def source(self) -> str:
        return self.margin_source.source

    def margins(self, batch, like: torch.Tensor) -> torch.Tensor:
        return self.margin_source(batch, like)

    def pair_term(self, d, batch):
        return -F.logsigmoid(d - self.margins(batch, d))


class HingeLoss(PairwiseLoss):
    """The hinge (max-margin) baseline, as in ranking SVMs (Herbrich et al. 1999; Joachims 2002):

        L = max(0, m - (r_w - r_l)),   m = margin + m(r)

    ``margin`` is a constant; ``source`` adds a per-comparison margin exactly as in ``MarginLoss``
    (default none). Unlike BT its gradient is zero once a pair is separated by m, so rewards stop
    growing; it is not a likelihood, so its rewards are not calibrated probabilities. Ties use the BT
    tie term (a hinge has no notion of "equal").
    """

    def __init__(
        self,
        margin: float = 1.0,
        source: str = "none",
        table: str = "large",
        scale: float = 1.0,
        balance: str = "none",
        center_coef: float = 0.0,
        center: str = "pair",
    ):
        super().__init__(balance, center_coef, center)
        self.margin = float(margin)
        self.margin_source = MarginSource(source, table, scale)

    def pair_term(self, d, batch):
        return F.relu(self.margin + self.margin_source(batch, d) - d)
