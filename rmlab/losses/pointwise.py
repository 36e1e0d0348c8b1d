"""Pointwise losses: the reward regressed on a per-response label, no comparisons needed."""

from __future__ import annotations

import torch

from rmlab.losses.base import LossOutput, RewardLoss

REGRESSION_TARGETS = ("score", "label")


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over the finite entries of ``target`` (NaN = missing label), any shape.

    Returns (loss, squared errors with 0 where the label is missing). No labels at all gives a loss of
    0 that is still attached to ``pred``'s graph, so a batch without labels steps nothing.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)} (no broadcasting)"
        )
    mask = torch.isfinite(target)
    # nan_to_num before the subtraction keeps NaN out of the backward pass of masked entries.
    err = torch.where(mask, pred - torch.nan_to_num(target.to(pred.dtype), nan=0.0, posinf=0.0, neginf=0.0), 0.0) ** 2
    return err.sum() / mask.sum().clamp_min(1), err


class RegressionLoss(RewardLoss):
    """Regression on a scalar rating, HelpSteer-style (Wang et al. 2023, "HelpSteer"; SteerLM):

        L = mean over labelled responses of (r_i - y_i)^2

    ``target``: ``score`` (a per-response rating, e.g. the simulator's 1-5) or ``label`` (a 0/1
    correctness label). Missing labels (NaN) are masked out, and a batch may have zero comparisons.
    ``scale`` and ``shift`` map the label to the reward's range: y = scale * label + shift.
    The attribute heads of a later issue reuse ``masked_mse`` per attribute.
    """

    def __init__(
        self,
        target: str = "score",
        scale: float = 1.0,
        shift: float = 0.0,
        center_coef: float = 0.0,
        center: str = "pair",
    ):
        super().__init__(center_coef, center)
        if target not in REGRESSION_TARGETS:
            raise ValueError(f"regression target must be one of {REGRESSION_TARGETS}, got {target!r}")
        self.target, self.scale, self.shift = target, float(scale), float(shift)
        self.response_field = target
        self.response_field_hint = (f"use data with a per-response {target} (ratings: data.format=ratings, or the "
                                    "simulator), loss.target=score|label to match the data, or a pairwise loss "
                                    "such as loss=bt")

    def objective(self, rewards: torch.Tensor, batch) -> LossOutput:
        y = getattr(batch, self.target, None)
        if y is None:
            raise ValueError(f"regression needs batch.{self.target} (one per response)")
        loss, err = masked_mse(rewards, self.scale * y.to(rewards.dtype) + self.shift)
        return LossOutput(loss, err.detach())
