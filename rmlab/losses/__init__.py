"""Preference losses. Each is a small nn.Module; a new loss is one file plus one yaml in conf/loss/.

Families: ``pairwise`` (BT eq 3, log-exp eq 4, margin eq 5, grouped eq 6 via ``balance=group``, hinge),
``scaled_bt`` (HelpSteer2-Preference), ``odin`` and ``grm`` (objectives against reward hacking),
``ties`` (Davidson, Rao-Kupper), ``listwise`` (Plackett-Luce), ``pointwise`` (regression). Centering
(Eisenstein et al. 2023) is the ``center_coef`` option of every loss (``base.RewardLoss``).
See docs/losses.md for the table of formulas and when to use each.
"""

from rmlab.losses.base import Comparisons, LossOutput, PairwiseLoss, RewardLoss, center_term, check_rewards
from rmlab.losses.grm import GRMLoss
from rmlab.losses.listwise import PlackettLuceLoss
from rmlab.losses.odin import OdinLoss, batch_pearson
from rmlab.losses.pairwise import LLAMA2_MARGINS, BTLoss, HingeLoss, LogExpLoss, MarginLoss, MarginSource
from rmlab.losses.pointwise import RegressionLoss, masked_mse
from rmlab.losses.scaled_bt import ScaledBTLoss
from rmlab.losses.ties import DavidsonLoss, RaoKupperLoss

__all__ = [
    "LLAMA2_MARGINS",
    "BTLoss",
    "Comparisons",
    "DavidsonLoss",
    "GRMLoss",
    "HingeLoss",
    "LogExpLoss",
    "LossOutput",
    "MarginLoss",
    "MarginSource",
    "OdinLoss",
    "PairwiseLoss",
    "PlackettLuceLoss",
    "RaoKupperLoss",
    "RegressionLoss",
    "RewardLoss",
    "ScaledBTLoss",
    "batch_pearson",
    "center_term",
    "check_rewards",
    "masked_mse",
]
