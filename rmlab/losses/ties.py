"""Paired-comparison models with an explicit tie outcome: Davidson (1970) and Rao-Kupper (1967).

Plain BT has no tie outcome; rmlab trains a tie toward equal rewards with BT at target 1/2
(``base.tie_term``). These two models instead give a tie its own probability, so a tie is a likelihood
like a win, and the tie parameter says how often ties happen at equal rewards. Both depend on the
rewards only through d = r_w - r_l, so they stay shift invariant.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from rmlab.losses.base import PairwiseLoss


class TieModelLoss(PairwiseLoss):
    """Shared part of the tie models: a positive tie parameter, fixed or learned (in log space)."""

    def __init__(
        self, tie_param: float, minimum: float, learn_tie_param: bool, balance: str, center_coef: float, center: str
    ):
        super().__init__(balance, center_coef, center)
        if not tie_param > minimum:
            raise ValueError(f"{type(self).__name__} needs tie_param > {minimum}, got {tie_param}")
        self.minimum = minimum
        # Learned as log(tie_param - minimum) so that gradient steps cannot leave the valid range.
        self._log_tie0 = math.log(tie_param - minimum)  # exact, for a later cast to float64 (_apply)
        value = torch.tensor(self._log_tie0)
        if learn_tie_param:
            self.log_tie = nn.Parameter(value)
        else:
            self.register_buffer("log_tie", value)

    def _apply(self, fn, *args, **kwargs):
        """``.double()`` (any cast to float64) converts the tie parameter like every other tensor, and
        also restores its configured value exactly while it is still the initial one: the float32
        rounding of log(tie_param - minimum) would otherwise stay (0.7 -> 0.7000000032), a 1e-9 error
        in every float64 loss. A value moved by training or loaded from a checkpoint is only cast."""
        before = self.log_tie
        dtype = before.dtype
        initial = (
            dtype != torch.float64
            and before.device.type != "meta"
            and before.detach().cpu().item() == torch.tensor(self._log_tie0, dtype=dtype).item()
        )
        out = super()._apply(fn, *args, **kwargs)
        if initial and self.log_tie.dtype == torch.float64:
            with torch.no_grad():
                self.log_tie.fill_(self._log_tie0)
        return out

    @property
    def tie_param(self) -> torch.Tensor:
        return self.log_tie.exp() + self.minimum


class DavidsonLoss(TieModelLoss):
    """Davidson's tie model (Davidson 1970, JASA 65:317): with pi = exp(r) and nu >= 0,

        P(w > l) = pi_w / (pi_w + pi_l + nu sqrt(pi_w pi_l))
        P(tie)   = nu sqrt(pi_w pi_l) / (same)

    Divided through by sqrt(pi_w pi_l), with d = r_w - r_l and Z = e^{d/2} + e^{-d/2} + nu:

        win:  L = log Z - d/2          tie:  L = log Z - log nu

    tie_param = nu: at equal rewards P(tie) = nu / (2 + nu) (nu = 1: a third of the comparisons).
    nu -> 0 gives BT for wins. ``learn_tie_param`` fits nu with the model (it joins the optimizer).
    """

    def __init__(
        self,
        tie_param: float = 1.0,
        learn_tie_param: bool = False,
        balance: str = "none",
        center_coef: float = 0.0,
        center: str = "pair",
    ):
        super().__init__(tie_param, 0.0, learn_tie_param, balance, center_coef, center)

    def _log_z(self, d: torch.Tensor) -> torch.Tensor:
        log_nu = torch.log(self.tie_param.to(d)).expand_as(d)
        return torch.logsumexp(torch.stack([d / 2, -d / 2, log_nu]), dim=0)

    def pair_term(self, d, batch):
        return self._log_z(d) - d / 2

    def tie_term(self, d, batch):
        return self._log_z(d) - torch.log(self.tie_param.to(d))


class RaoKupperLoss(TieModelLoss):
    """Rao-Kupper's tie model (Rao & Kupper 1967, JASA 62:194): with pi = exp(r) and theta > 1,

        P(w > l) = pi_w / (pi_w + theta pi_l) = sigmoid(d - log theta)
        P(tie)   = (theta^2 - 1) pi_w pi_l / ((pi_w + theta pi_l)(theta pi_w + pi_l))
                 = (theta^2 - 1) sigmoid(d - log theta) sigmoid(-d - log theta)

    so a win is Llama 2's margin loss with the fixed margin log theta, and

        tie:  L = -log(theta^2 - 1) - log sigmoid(d - log theta) - log sigmoid(-d - log theta)

    tie_param = theta: at equal rewards P(tie) = (theta - 1) / (theta + 1) (theta = 2: a third).
    theta -> 1 gives BT for wins.
    """

    def __init__(
        self,
        tie_param: float = 2.0,
        learn_tie_param: bool = False,
        balance: str = "none",
        center_coef: float = 0.0,
        center: str = "pair",
    ):
        super().__init__(tie_param, 1.0, learn_tie_param, balance, center_coef, center)

    def pair_term(self, d, batch):
        return -F.logsigmoid(d - torch.log(self.tie_param.to(d)))

    def tie_term(self, d, batch):
        theta = self.tie_param.to(d)
        a = torch.log(theta)
        # log(theta^2 - 1) written as log(expm1(2a)): exact as theta -> 1.
        return -torch.log(torch.expm1(2 * a)) - F.logsigmoid(d - a) - F.logsigmoid(-d - a)
