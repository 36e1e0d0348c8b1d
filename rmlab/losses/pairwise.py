"""Bradley-Terry and its margin variants (eqs 3-5 of the chapter)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rmlab.losses.base import PairwiseLoss

# Llama 2 (Touvron et al. 2023, Table 28): margin by preference strength on its 4-level scale.
# Index = rmlab strength level: 0 negligibly better/unsure, 1 slightly better, 2 better, 3 significantly better.
LLAMA2_MARGINS = {"large": (0.0, 1.0, 2.0, 3.0), "small": (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)}


class BTLoss(PairwiseLoss):
    """Bradley-Terry (eq 3; Bradley & Terry 1952, as in InstructGPT, Ouyang et al. 2022):

        L = -log sigmoid(r_w - r_l)

    computed with ``logsigmoid``, which is stable for any |r_w - r_l|.
    """

    def pair_term(self, d, batch):
        return -F.logsigmoid(d)


class LogExpLoss(PairwiseLoss):
    """The log-exp form of BT (eq 4, in its correct form; the chapter prints a typo):

        L = log(1 + exp(r_l - r_w))

    Computed stably as ``max(x, 0) + log1p(exp(-|x|))`` with x = r_l - r_w, so it neither overflows
    at x = +1e4 nor loses precision at x = -1e4. It equals BT exactly; it is here so a sweep can show
    that (``experiment=bt_vs_logexp``).
    """

    def pair_term(self, d, batch):
        x = -d
        return torch.clamp(x, min=0) + torch.log1p(torch.exp(-x.abs()))


class MarginLoss(PairwiseLoss):
    """Llama 2's margin loss (eq 5; Touvron et al. 2023):

        L = -log sigmoid(r_w - r_l - m(r))

    Where m(r) comes from (``source``):
    - ``value``: the comparison's margin field (explicit margin, rating gap, judge-score gap) x ``scale``;
    - ``strength``: Llama 2's table for its 4-level scale, ``table=large`` (3, 2, 1, 0) or
      ``table=small`` (1, 2/3, 1/3, 0), x ``scale``.
    A comparison with no margin gets m = 0 (plain BT). Ties use the tie term, without margin.
    """

    def __init__(self, source: str = "value", table: str = "large", scale: float = 1.0, balance: str = "none"):
        super().__init__(balance)
        if source not in ("value", "strength"):
            raise ValueError(f"margin source must be value|strength, got {source!r}")
        if table not in LLAMA2_MARGINS:
            raise ValueError(f"margin table must be one of {sorted(LLAMA2_MARGINS)}, got {table!r}")
        self.source, self.table, self.scale = source, table, scale
        self.register_buffer("_table", torch.tensor(LLAMA2_MARGINS[table]), persistent=False)

    def margins(self, batch, like: torch.Tensor) -> torch.Tensor:
        if self.source == "value":
            m = torch.nan_to_num(batch.margin.to(like.dtype), nan=0.0)
        else:
            s = batch.strength
            if int(s.max(initial=-1) if s.numel() else -1) > 3:
                raise ValueError(f"strength levels must be 0..3 for the Llama 2 table, got {int(s.max())}")
            m = torch.where(s >= 0, self._table.to(like)[s.clamp(0, 3)], torch.zeros_like(like))
        return self.scale * m

    def pair_term(self, d, batch):
        return -F.logsigmoid(d - self.margins(batch, d))
