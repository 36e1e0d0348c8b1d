"""Losses made for the heads beyond the scalar one: answer cross-entropy (generative verifier, pairwise judge)
and the attribute loss (ArmoRM's two stages)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rmlab.losses.base import LossOutput, RewardLoss, check_rewards
from rmlab.losses.critique import CritiqueLoss
from rmlab.losses.pairwise import BTLoss
from rmlab.losses.pointwise import masked_mse


class AnswerCELoss(RewardLoss):
    """Cross-entropy on the answer token, for generative reward models (GenRM, Zhang et al. 2024):

        L = mean over labelled rows of -[y log P(yes) + (1 - y) log P(no)],  P(yes) = sigmoid(r)

    where ``r = log P(yes) - log P(no)`` is the model's output (restricted to the two answer tokens, the
    two-way softmax is exactly ``sigmoid(r)``). ``y = batch.label``: the verifier's pointwise 0/1
    correctness label, or the judge's "A is the chosen one" (1 / 0, and 0.5 for a tie). NaN labels are
    masked; a batch without labels gives 0, still attached to the graph.
    """

    response_field = "label"
    response_field_hint = ("use data with 0/1 labels (a `label` field, or the simulator), model=pairwise_judge (it "
                           "labels its own rows from the comparisons), or a pairwise loss such as loss=bt")

    def objective(self, rewards: torch.Tensor, batch) -> LossOutput:
        y = getattr(batch, "label", None)
        if y is None:
            raise ValueError("answer cross-entropy needs batch.label (one 0/1 label per row)")
        keep = torch.isfinite(y)
        n = getattr(batch, "n_labels", None)  # a collated batch counted its labels on the host
        if n is None:  # any other batch asks the device
            if not keep.any():
                return LossOutput(rewards.sum() * 0.0, rewards.new_zeros(0))
            rows = keep.nonzero().squeeze(1)
        else:
            if n == 0:
                return LossOutput(rewards.sum() * 0.0, rewards.new_zeros(0))
            # The labelled rows with their count known: no read-back of the output size (a plain nonzero's).
            rows = torch.nonzero_static(keep, size=n).squeeze(1)
        terms = F.binary_cross_entropy_with_logits(rewards[rows], y[rows].to(rewards.dtype), reduction="none")
        return LossOutput(terms.mean(), terms.detach())


class AttributeLoss(RewardLoss):
    """Multi-attribute regression plus the preference loss of the combination (ArmoRM, Wang et al. 2024):

        L = regression_weight * masked MSE(a_i, rating_i)  +  preference_weight * BT(sum_i w_i * sg(a_i))

    ``a`` [N, A] are the head's attribute outputs, ``w`` [N, A] the combination weights (gating network or
    fixed), ``sg`` stop-gradient: the preference pairs train the gate only, and each attribute output
    stays a calibrated regression of its rating (stage 2 on a frozen stage 1, in the same steps). With
    fixed weights the BT term has no parameter to move and is only reported. NaN ratings are masked.
    Needs the model's per-attribute outputs: the module passes ``heads=`` (``needs_heads``).

    ``preference_trains``: ``gate`` (the default, ArmoRM's separation above) or ``all``: no stop-gradient,
    so the preference pairs also shape the backbone and the attribute outputs. Use ``all`` when the
    backbone is fine-tuned from scratch on few ratings: qualities that only show in a comparison of two
    responses to the same prompt (is it on topic?) are learned from the pairs much faster than from
    pointwise ratings, and the regression term keeps each output tied to its rating.
    """

    needs_heads = True
    required_outputs = ("attributes", "weights")

    def __init__(
        self,
        regression_weight: float = 1.0,
        preference_weight: float = 1.0,
        balance: str = "none",
        preference_trains: str = "gate",
    ):
        super().__init__()
        if preference_trains not in ("gate", "all"):
            raise ValueError(f"preference_trains must be gate|all, got {preference_trains!r}")
        self.regression_weight, self.preference_weight = float(regression_weight), float(preference_weight)
        self.preference_trains = preference_trains
        self.bt = BTLoss(balance=balance)

    def forward(self, rewards: torch.Tensor, batch, heads: dict[str, torch.Tensor] | None = None) -> LossOutput:
        if heads is None or "attributes" not in heads:
            raise ValueError("the attribute loss needs per-attribute outputs: use model.head=attributes (rmlab.models.attributes)")
        check_rewards(rewards, batch)
        a, w = heads["attributes"], heads["weights"]
        target = batch.attributes
        if target.shape[1] == 0:  # the data has no ratings: only the preference term is left
            reg = a.sum() * 0.0
        else:
            reg, _ = masked_mse(a, target.to(a.dtype))
        combined = (w * (a.detach() if self.preference_trains == "gate" else a)).sum(-1)
        if batch.num_comparisons:
            pref = self.bt(combined, batch)
            pref_loss, terms = pref.loss, pref.terms
        else:
            pref_loss, terms = combined.sum() * 0.0, combined.new_zeros(0)
        loss = self.regression_weight * reg + self.preference_weight * pref_loss
        return LossOutput(loss, terms, {"regression": reg.detach(), "preference": pref_loss.detach()})


def head_default_loss(head: str | None = None, balance: str = "none") -> RewardLoss:
    """The objective each head is designed for, so a sweep over ``model=`` needs no matching ``loss=``:
    the attribute loss for ``head=attributes``, answer cross-entropy for the pairwise judge, critique LM + BT for
    ``head=cloud``, BT otherwise
    (scalar head, and the generative verifier on pairwise data)."""
    if head == "attributes":
        return AttributeLoss(balance=balance)
    if head == "judge":
        return AnswerCELoss()
    if head == "cloud":  # critique LM + BT on the reward read after the critique
        return CritiqueLoss(BTLoss(balance=balance))
    return BTLoss(balance=balance)
