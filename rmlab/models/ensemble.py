"""Several reward models scored as one: mean, worst case, or uncertainty-weighted (Coste et al. 2024).

``EnsembleRewardModel`` is a ``RewardModel`` like any other, so ``rmlab.score``, ``eval.py`` and ``rmlab.bon``
score it through the same loop (``rmlab.models.scoring``). Each member's reward is first put in its own
normalized units, ``(r - mean) / std`` with the mean and std of its rewards on its run's val set (the export's
``config.rmlab.reward_mean`` / ``reward_std``, which ``python train.py`` writes): Bradley-Terry rewards are
defined up to an offset, so without this the worst case would just be the member with the lowest offset and the
spread would measure offsets, not disagreement. The normalized member rewards ``z`` [M, N] combine as:

- ``mean``: ``mean_m z_m``;
- ``min``: ``min_m z_m``, the worst case (Coste et al.'s WCO);
- ``uwo``: ``mean_m z_m - lam * std_m z_m`` (population std, over members): uncertainty-weighted. Coste et al.
  penalize the variance; the std keeps ``lam`` in reward units.

Members must read the same rows: one tokenizer (same vocabulary and special tokens) and one kind of head (seeds
of one recipe, or recipes on one backbone). A pairwise judge outputs order logits, not rewards, and cannot join.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from rmlab.models.base import RewardModel

COMBINES = ("mean", "min", "uwo")


def combine(z: torch.Tensor, how: str, lam: float = 1.0) -> torch.Tensor:
    """Member rewards ``z`` [M, N] (already normalized) -> one reward per row [N]."""
    if z.dim() != 2 or z.shape[0] < 1:
        raise ValueError(f"member rewards must be [members, rows], got shape {tuple(z.shape)}")
    if how == "mean":
        return z.mean(0)
    if how == "min":
        return z.min(0).values
    if how == "uwo":
        return z.mean(0) - lam * z.std(0, correction=0)
    raise ValueError(f"ensemble combine must be one of {' | '.join(COMBINES)}, got {how!r}")


def member_stats(meta: dict, name: str) -> tuple[float, float]:
    """(mean, std) of a member's val rewards from its export metadata; a clear error when they are missing."""
    if "reward_mean" not in meta or "reward_std" not in meta:
        raise ValueError(
            f"ensemble member {name} has no reward_mean/reward_std in its export's config.json (rmlab train writes "
            "them from the val set); members are normalized by them before combining. Use exports of rmlab runs "
            "with validation (data.val_fraction > 0)"
        )
    std = float(meta["reward_std"])
    return float(meta["reward_mean"]), std if std > 0 else 1.0


def _tokenizer_identity(tok: Any) -> tuple:
    return (type(tok).__name__, len(tok), tok.pad_token_id, tok.cls_token_id, tok.bos_token_id, tok.eos_token_id)


class EnsembleRewardModel(RewardModel):
    """Members' rewards, each normalized by its own val statistics, combined into one (see module docstring).

    ``score_heads`` also returns ``members``: the normalized member rewards [N, M], for diagnostics."""

    extra_outputs = ("members",)

    def __init__(
        self,
        members: Sequence[RewardModel],
        stats: Sequence[tuple[float, float]],
        how: str = "mean",
        lam: float = 1.0,
        names: Sequence[str] | None = None,
    ):
        if len(members) < 2:
            raise ValueError("an ensemble needs at least 2 members")
        if len(stats) != len(members):
            raise ValueError(f"{len(members)} members but {len(stats)} (mean, std) pairs")
        if how not in COMBINES:
            raise ValueError(f"ensemble combine must be one of {' | '.join(COMBINES)}, got {how!r}")
        first = members[0]
        for i, m in enumerate(members[1:], start=1):
            if m.kind != first.kind or repr(m.group_template) != repr(first.group_template):
                raise ValueError(f"ensemble member {i} is a {m.kind} model, member 0 a {first.kind}: members must "
                                 "share one head kind and template")
            if _tokenizer_identity(m.tokenizer) != _tokenizer_identity(first.tokenizer):
                raise ValueError(f"ensemble member {i} has another tokenizer than member 0 "
                                 f"({_tokenizer_identity(m.tokenizer)} vs {_tokenizer_identity(first.tokenizer)}); "
                                 "members must read the same token rows")
        if first.kind == "judge":
            raise ValueError("a pairwise judge outputs order logits, not rewards: it cannot join an ensemble")
        super().__init__(None, first.tokenizer)
        self.members = nn.ModuleList(members)
        self.kind, self.group_template = first.kind, first.group_template
        self.how, self.lam = how, float(lam)
        self.names = list(names) if names is not None else [f"member{i}" for i in range(len(members))]
        self.register_buffer("mean", torch.tensor([s[0] for s in stats], dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor([s[1] for s in stats], dtype=torch.float32), persistent=False)

    @property
    def config(self):
        return self.members[0].config

    def recorded_scoring(self) -> dict:
        return self.members[0].recorded_scoring()  # the members read the same rows (checked above: one tokenizer)

    def member_rewards(self, batch) -> torch.Tensor:
        """Normalized rewards of every member [M, N]."""
        z = torch.stack([m.score_batch(batch).float() for m in self.members])
        return (z - self.mean[:, None]) / self.std[:, None]

    def score_batch(self, batch) -> torch.Tensor:
        return combine(self.member_rewards(batch), self.how, self.lam)

    def score_heads(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.member_rewards(batch)
        return combine(z, self.how, self.lam), {"members": z.T}

    def head_report(self, scored: Iterable) -> dict[str, float]:
        """How much the members disagree: mean std over rows, and the mean correlation between member pairs."""
        zs = [s.heads["members"] for s in scored if "members" in s.heads]
        if not zs:
            return {}
        z = torch.cat(zs).double()  # [N, M]
        out = {"ensemble/member_std_mean": float(z.std(1, correction=0).mean())}
        if z.shape[0] > 2:
            c = torch.corrcoef(z.T)
            m = z.shape[1]
            off = c[~torch.eye(m, dtype=torch.bool)]
            out["ensemble/member_corr_mean"] = float(off.mean())
        return out

    def export_meta(self) -> dict[str, Any]:
        return {"head": "ensemble", "members": self.names, "combine": self.how, "lam": self.lam}

    def save_pretrained(self, out_dir, extra=None):
        raise ValueError("an ensemble is not exported as one model: keep its members' exports and combine them when "
                         "scoring (rmlab.score --model a --model b ..., eval.py ensemble.members=[...], rmlab.bon)")
