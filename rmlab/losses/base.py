"""Base classes for preference losses: rewards + comparison structure -> scalar (+ terms for logging).

A loss knows nothing of Lightning or tokenizers. It reads, from any object with these tensors
(``RewardBatch`` has them; ``Comparisons`` below is the minimal one for tests):

- ``winner``, ``loser`` [C]: row indices into ``rewards``;
- ``margin`` [C] (NaN = none), ``strength`` [C] (-1 = none), ``weight`` [C], ``tie`` [C] (bool),
  ``group_weight`` [C] (1 / C(K,2) of the comparison's prompt), ``cmp_group`` [C];
- ``group_index`` [N], ``rank`` [N] (0 = best, NaN = unranked), ``score`` [N] for K-wise / pointwise
  losses; ``response_len`` [N] (response tokens, counted by the collator) for length-aware losses (ODIN).

Every loss derives from ``RewardLoss``, whose ``forward`` checks shapes, calls the loss's own
``objective`` and then adds the reward-centering term when ``center_coef > 0``. Centering is thus one
option that composes with every loss, not a copy of each loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rmlab.data import types as data_types

# Fields a loss may read, by the axis they live on: [C] per comparison, [N] per response (declared in
# rmlab.data.types, the one declaration of the batch contract).
COMPARISON_FIELDS = (*(f.name for f in data_types.COMPARISON_FIELDS), "cmp_group")
RESPONSE_FIELDS = ("group_index", "response_len", *(f.name for f in data_types.RESPONSE_FIELDS))
CENTER_MODES = ("pair", "group")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar
    # Per-unit terms before weighting, for logging: [C] per comparison for pairwise losses, [G] per
    # ranked group for Plackett-Luce, [N] per labelled response for regression.
    terms: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named add-ons (e.g. "center"), detached


class _ComparisonDefaults:
    def __post_init__(self):
        c = self.winner.numel()
        dtypes = {"float": torch.get_default_dtype(), "long": torch.long, "bool": torch.bool}
        for f in data_types.COMPARISON_FIELDS:
            if f.from_record and getattr(self, f.name) is None:
                setattr(self, f.name, torch.full((c,), f.missing, dtype=dtypes[f.dtype]))
        if self.cmp_group is None:
            # Without a group per comparison, the comparisons belong to the winner's group when
            # responses have one, else to a single group.
            self.cmp_group = (
                self.group_index[self.winner] if self.group_index is not None else torch.zeros(c, dtype=torch.long)
            )
        if self.group_weight is None:
            # Eq 6: each comparison weighs 1 / (comparisons of its prompt), as the collator does.
            # float64, so 1/3 is exact to float64 tests; a loss casts weights to the rewards' dtype.
            counts = torch.bincount(self.cmp_group, minlength=1).double() if c else torch.ones(1, dtype=torch.float64)
            self.group_weight = 1.0 / counts[self.cmp_group]


# The comparison structure alone, for using a loss outside a RewardBatch: winner and loser [C], then every
# declared field (None = its missing value for per-comparison fields, absent for per-response ones).
Comparisons = make_dataclass(
    "Comparisons",
    [
        ("winner", torch.Tensor),
        ("loser", torch.Tensor),
        *[(name, torch.Tensor | None, field(default=None)) for name in COMPARISON_FIELDS + RESPONSE_FIELDS],
        ("extra", dict, field(default_factory=dict)),
    ],
    bases=(_ComparisonDefaults,),
)
Comparisons.__module__ = __name__


def check_rewards(rewards: torch.Tensor, batch) -> None:
    """Shapes are asserted: a [N,1] reward against [C] indices is the classic silent broadcast bug."""
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D [N] (one per response), got shape {tuple(rewards.shape)}; "
            "squeeze the head output with .reshape(-1) (a [B,1] - [B] difference broadcasts to [B,B])"
        )
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")
    w, lo = batch.winner, batch.loser
    if w.shape != lo.shape or w.dim() != 1:
        raise ValueError(f"winner and loser must be 1-D and equal in shape, got {tuple(w.shape)} and {tuple(lo.shape)}")
    # A collated RewardBatch built its indices from each group's own (``indices_checked``): reading them back
    # here would make every training step wait for the device.
    if w.numel() and not getattr(batch, "indices_checked", False) and int(max(w.max(), lo.max())) >= rewards.numel():
        raise ValueError(
            f"a comparison indexes response {int(max(w.max(), lo.max()))} but there are {rewards.numel()} rewards"
        )
    for names, n, axis in (
        (COMPARISON_FIELDS, w.numel(), "C (comparisons)"),
        (RESPONSE_FIELDS, rewards.numel(), "N (responses)"),
    ):
        for name in names:
            t = getattr(batch, name, None)
            if t is not None and tuple(t.shape) != (n,):
                raise ValueError(f"batch.{name} must have shape [{axis}] = ({n},), got {tuple(t.shape)}")


def has_ties(batch) -> bool:
    """Whether any comparison is a tie: a RewardBatch counted them on the host (``n_ties``), so a training
    step does not read the flags back from the device; other batches are asked."""
    n = getattr(batch, "n_ties", None)
    return bool(batch.tie.any()) if n is None else n > 0


def tie_term(d: torch.Tensor) -> torch.Tensor:
    """BT with target 1/2: -0.5 log s(d) - 0.5 log s(-d). Minimized at d = 0."""
    return -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))


def num_groups(batch) -> int | None:
    """The batch's number of groups when it is known on the host (a RewardBatch's ``group_ids``), else None."""
    ids = getattr(batch, "group_ids", None)
    return len(ids) if ids else None


def group_sums(values: torch.Tensor, group: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Sum of ``values`` [N] per group id in ``group`` [N] -> [G]. G = ``size`` when the caller knows it on the
    host (``num_groups``: no read-back from the device), else max id + 1 (read from ``group``)."""
    g = size if size is not None else (int(group.max()) + 1 if group.numel() else 0)
    return values.new_zeros(g).index_add(0, group, values)


def center_term(rewards: torch.Tensor, batch, mode: str = "pair") -> torch.Tensor:
    """Reward centering (Eisenstein et al. 2023, "Helping or Herding?"), the unscaled penalty.

    ``pair``: mean over comparisons of (r_w + r_l)^2, as TRL's ``center_rewards_coefficient``.
    ``group``: mean over prompts of (mean of r over the prompt's responses)^2; it also covers responses
        in no comparison, and pointwise batches.
    Zero (still attached to the graph) when the batch has nothing to center.
    """
    if mode == "pair":
        if batch.winner.numel() == 0:
            return rewards.sum() * 0.0
        return ((rewards[batch.winner] + rewards[batch.loser]) ** 2).mean()
    if mode == "group":
        gi = batch.group_index
        if gi is None or gi.numel() == 0:
            return rewards.sum() * 0.0
        g = num_groups(batch)
        sums, counts = group_sums(rewards, gi, g), group_sums(torch.ones_like(rewards), gi, g)
        present = counts > 0  # group ids need not be contiguous
        # The mean over present groups as a masked sum: no boolean indexing (a read-back of its size).
        sq = torch.where(present, (sums / counts.clamp_min(1)) ** 2, 0.0)
        return sq.sum() / present.sum().clamp_min(1)
    raise ValueError(f"center must be one of {CENTER_MODES}, got {mode!r}")


class RewardLoss(nn.Module):
    """Base of every loss. Subclasses implement ``objective(rewards, batch) -> LossOutput``.

    center_coef: weight of the reward-centering penalty (``center_term``) added to the objective;
        0 turns it off. It breaks the shift invariance of BT on purpose: it pins the reward's offset.
    center: ``pair`` or ``group``, see ``center_term``.
    """

    # True for a loss that also reads the model's extra outputs (``forward(rewards, batch, heads=...)``).
    needs_heads = False
    # The names of those outputs; the module asks the model for them once, before training
    # (``RewardModel.require_outputs``), so a model that cannot give them fails at start-up, named.
    required_outputs: tuple[str, ...] = ()
    # The per-response batch field (rmlab.data.types.RESPONSE_FIELDS) a pointwise or listwise loss trains on, and
    # what to do when the training data has none: rmlab.train refuses such a run rather than step on a loss of 0.
    response_field: str | None = None
    response_field_hint: str = ""

    def __init__(self, center_coef: float = 0.0, center: str = "pair"):
        super().__init__()
        if center not in CENTER_MODES:
            raise ValueError(f"center must be one of {CENTER_MODES}, got {center!r}")
        if center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {center_coef}")
        self.center_coef, self.center = float(center_coef), center

    def objective(self, rewards: torch.Tensor, batch) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_batch(self, batch) -> None:
        """Checks of the batch's values that need them on the host (a margin source's range), run by
        ``RewardModule.on_before_batch_transfer`` on the collated CPU batch, before it goes to the device, so a
        training step never reads them back. Every submodule with a ``check_values(batch)`` is asked (a wrapped
        loss's margin source too). A batch not checked there (``host_checked`` unset) is checked in the loss."""
        for m in self.modules():
            check = getattr(m, "check_values", None)
            if check is not None:
                check(batch)

    def forward(self, rewards: torch.Tensor, batch) -> LossOutput:
        check_rewards(rewards, batch)
        out = self.objective(rewards, batch)
        if out.loss.dim() != 0:
            raise ValueError(
                f"{type(self).__name__} returned a loss of shape {tuple(out.loss.shape)}, expected a scalar"
            )
        if self.center_coef > 0:
            c = center_term(rewards, batch, self.center)
            out = LossOutput(out.loss + self.center_coef * c, out.terms, {**out.parts, "center": c.detach()})
        return out


class PairwiseLoss(RewardLoss):
    """A loss that is a (weighted) mean of per-comparison terms f(d), d = r_w - r_l.

    balance: ``none`` weighs every comparison alike; ``group`` is InstructGPT's eq 6: each comparison
        gets 1/C(K,2) of its prompt, so every prompt weighs the same whatever its K.
    ties: a tie comparison is trained toward equal rewards with BT at target 1/2 (``tie_term``);
        subclasses with a tie model (``rmlab.losses.ties``) override ``tie_term``.
    """

    def __init__(self, balance: str = "none", center_coef: float = 0.0, center: str = "pair"):
        super().__init__(center_coef, center)
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

    def objective(self, rewards: torch.Tensor, batch) -> LossOutput:
        d = rewards[batch.winner] - rewards[batch.loser]
        terms = self.pair_term(d, batch)
        if has_ties(batch):
            terms = torch.where(batch.tie, self.tie_term(d, batch), terms)
        if terms.shape != d.shape:
            raise ValueError(f"per-comparison terms have shape {tuple(terms.shape)}, expected {tuple(d.shape)}")
        w = self.comparison_weights(batch).to(terms.dtype)
        return LossOutput(loss=(w * terms).sum() / w.sum().clamp_min(1e-12), terms=terms.detach())
