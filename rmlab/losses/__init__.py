"""Preference losses. Each is a small nn.Module; a new loss is one file plus one yaml in conf/loss/."""

from rmlab.losses.base import Comparisons, LossOutput, PairwiseLoss
from rmlab.losses.pairwise import BTLoss, LogExpLoss, MarginLoss

__all__ = ["BTLoss", "Comparisons", "LogExpLoss", "LossOutput", "MarginLoss", "PairwiseLoss"]
