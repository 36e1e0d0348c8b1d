"""Collate tokenized groups into one batch of responses plus the comparisons among them.

Example (runnable)::

    >>> from rmlab.data.tokenize import TokenizedGroup
    >>> g = TokenizedGroup(prompt_ids=[5, 6], response_ids=[[7, 1], [8, 9, 1]], winner=[1], loser=[0])
    >>> b = collate([g, g], pad_id=0)
    >>> b.input_ids.tolist()            # two groups x two responses, right-padded
    [[5, 6, 7, 1, 0], [5, 6, 8, 9, 1], [5, 6, 7, 1, 0], [5, 6, 8, 9, 1]]
    >>> b.group_index.tolist(), b.winner.tolist(), b.loser.tolist()
    ([0, 0, 1, 1], [1, 3], [0, 2])
    >>> b.margin.tolist(), b.weight.tolist()  # fields the group does not give: their missing values
    ([nan, nan], [1.0, 1.0])

Each response appears once however many comparisons it is in; ``winner``/``loser`` index rows of
``input_ids``. A loss receives ``rewards`` (one per row) and this batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field

import torch

from rmlab.data.layout import LayoutSpec, PackedLayout, build_layout
from rmlab.data.tokenize import TokenizedGroup
from rmlab.data.types import COMPARISON_FIELDS, RESPONSE_FIELDS


class _RewardBatchMethods:
    # winner/loser were built by collate from each group's own indices: a loss need not read them back
    # from the device to check them (rmlab.losses.base.check_rewards).
    indices_checked = True

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    @property
    def num_comparisons(self) -> int:
        return int(self.winner.numel())

    def __len__(self) -> int:  # Lightning reads a batch size from here when none is given
        return self.num_comparisons

    def _map(self, fn):
        moved = {
            f.name: fn(v)
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), (torch.Tensor, PackedLayout))
        }
        return dataclasses.replace(self, **moved)

    def to(self, device, non_blocking: bool | None = None):
        """The same batch with every tensor on ``device`` (Lightning's batch transfer calls this too).
        Copies to a GPU are ``non_blocking`` by default: from pinned memory (``pin_memory``) the host
        goes on while they run."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        """Page-locked copies (the DataLoader's ``pin_memory=True`` calls this in its pinning thread)."""
        return self._map(lambda v: v.pin_memory())


# One row per unique response, the comparisons among them, and one tensor per declared field (rmlab.data.types):
# [C] per comparison, [N] per response.
RewardBatch = dataclasses.make_dataclass(
    "RewardBatch",
    [
        ("input_ids", torch.Tensor),  # [N, L] one row per unique response (prompt + response)
        ("attention_mask", torch.Tensor),  # [N, L]
        ("position_ids", torch.Tensor),  # [N, L] from the mask, so left padding does not shift positions
        ("group_index", torch.Tensor),  # [N] group of each response, 0..G-1
        ("response_len", torch.Tensor),  # [N] response tokens (no prompt), for length-bias metrics
        ("winner", torch.Tensor),  # [C] row index of the preferred response
        ("loser", torch.Tensor),  # [C]
        *[(f.name, torch.Tensor) for f in COMPARISON_FIELDS],  # [C] each
        ("cmp_group", torch.Tensor),  # [C] group of each comparison
        *[(f.name, torch.Tensor) for f in RESPONSE_FIELDS],  # [N] each
        ("attributes", torch.Tensor),  # [N, A] per-attribute ratings (A may be 0), NaN = missing
        ("group_ids", list, field(default_factory=list)),
        ("subsets", list, field(default_factory=list)),  # per group
        ("prompt_len", torch.Tensor | None, field(default=None)),  # [N] tokens of the shared prefix in each row
        ("last_token", torch.Tensor | None, field(default=None)),  # [N] column of each row's last real token
        ("n_ties", int, field(default=0)),  # tie comparisons, counted on the host (a step never reads it back)
        # The loss's value checks ran on this batch's host copy (RewardModule.on_before_batch_transfer): a step on
        # the device need not read the values back to check them (rmlab.losses.base.RewardLoss.check_batch).
        ("n_labels", int | None, field(default=None)),  # rows with a finite label, counted on the host, as n_ties
        ("host_checked", bool, field(default=False)),
        # [2, T] (row, position) of the response tokens an LM loss scores (loss=grm), built on the host copy by the
        # model (RewardModel.prepare_batch) when it needs them; None otherwise.
        ("lm_target", torch.Tensor | None, field(default=None)),
        ("packed", PackedLayout | None, field(default=None)),  # the packed layout (rmlab.data.layout), when asked
    ],
    bases=(_RewardBatchMethods,),
)
RewardBatch.__module__ = __name__  # picklable (DataLoader workers) under its module-level name
DTYPES = {"float": torch.float32, "long": torch.long, "bool": torch.bool}


def collate(
    groups: list[TokenizedGroup], pad_id: int, padding_side: str = "right", layout: LayoutSpec | None = None
) -> RewardBatch:
    """``layout``: also build the packed layout the model's packed forward reads (rmlab.data.layout)."""
    rows, gidx, rlen, plen = [], [], [], []
    win, los, cg, attrs = [], [], [], []
    per_cmp: dict[str, list] = {f.name: [] for f in COMPARISON_FIELDS}
    per_resp: dict[str, list] = {f.name: [] for f in RESPONSE_FIELDS}
    n_attr = max((len(g.attributes[0]) for g in groups if g.attributes), default=0)
    for gi, g in enumerate(groups):
        base = len(rows)
        for i, r in enumerate(g.response_ids):
            rows.append(g.prompt_ids + r)
            gidx.append(gi)
            rlen.append(len(r) - (g.critique_lens[i] if g.critique_lens else 0))  # a critique is not the response
            plen.append(len(g.prompt_ids))
        win += [base + i for i in g.winner]
        los += [base + i for i in g.loser]
        cg += [gi] * len(g.winner)
        # An empty list means "none given": the field's missing value for each comparison or response.
        for f in COMPARISON_FIELDS:
            per_cmp[f.name] += getattr(g, f.group_name) or [f.missing] * len(g.winner)
        for f in RESPONSE_FIELDS:
            per_resp[f.name] += getattr(g, f.group_name) or [f.missing] * g.k
        nan_row = [float("nan")] * n_attr
        attrs += list(g.attributes) if g.attributes else [nan_row] * g.k
    n, longest = len(rows), max(len(r) for r in rows)
    if min(len(r) for r in rows) == 0:
        raise ValueError("collate: a row has no token at all (an empty prompt and an empty response)")
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        if padding_side == "left":
            ids[i, longest - len(r) :] = torch.tensor(r)
            mask[i, longest - len(r) :] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return RewardBatch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        group_index=torch.tensor(gidx),
        response_len=torch.tensor(rlen),
        winner=torch.tensor(win, dtype=torch.long),
        loser=torch.tensor(los, dtype=torch.long),
        **{f.name: torch.tensor(per_cmp[f.name], dtype=DTYPES[f.dtype]) for f in COMPARISON_FIELDS},
        cmp_group=torch.tensor(cg, dtype=torch.long),
        **{f.name: torch.tensor(per_resp[f.name], dtype=DTYPES[f.dtype]) for f in RESPONSE_FIELDS},
        attributes=torch.tensor(attrs, dtype=torch.float32).reshape(n, n_attr),
        group_ids=[g.group_id for g in groups],
        subsets=[g.subset for g in groups],
        prompt_len=torch.tensor(plen),
        last_token=torch.tensor([longest - 1 if padding_side == "left" else len(r) - 1 for r in rows]),
        n_ties=sum(bool(t) for t in per_cmp["tie"]),
        n_labels=sum(math.isfinite(x) for x in per_resp["label"]),
        packed=None
        if layout is None
        else build_layout([r[:p] for r, p in zip(rows, plen)], [r[p:] for r, p in zip(rows, plen)], gidx, layout, pad_id),
    )


class Collator:
    """Picklable collate function for DataLoader workers."""

    def __init__(self, pad_id: int, padding_side: str = "right", layout: LayoutSpec | None = None):
        self.pad_id, self.padding_side, self.layout = pad_id, padding_side, layout

    def __call__(self, groups: list[TokenizedGroup]) -> RewardBatch:
        return collate(groups, self.pad_id, self.padding_side, self.layout)
