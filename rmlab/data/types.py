"""The data contract: a preference *group* is one prompt, K >= 2 responses and the comparisons among them.

A plain chosen/rejected pair is the K = 2 group with one comparison. A ranking is a group whose
responses carry a rank (0 = best). Every later stage (tokenization, batching, losses, metrics) works
on groups, so all C(K,2) comparisons of a prompt can share one batch and each response is scored once.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

NAN = float("nan")


@dataclass(frozen=True)
class BatchField:
    """One per-comparison or per-response value that flows from the records to the loss.

    Declared once here (``COMPARISON_FIELDS``, ``RESPONSE_FIELDS``); ``TokenizedGroup`` (rmlab.data.tokenize),
    ``RewardBatch`` (rmlab.data.collate) and the loss-side ``Comparisons`` (rmlab.losses.base) are built from
    these declarations, so a new field is one line here plus where a format adapter reads it.
    """

    name: str  # the RewardBatch attribute (and Comparison's, for a per-comparison field read from a record)
    group_name: str  # the list's name in PreferenceGroup / TokenizedGroup
    dtype: str  # float | long | bool
    missing: Any  # the value when the data has none
    doc: str
    from_record: bool = True  # False: computed by rmlab (tokenization), not read from a record


COMPARISON_FIELDS = (
    BatchField("margin", "margin", "float", NAN, "a continuous margin (rating gap, judge-score gap, margin field); NaN = none"),
    BatchField("strength", "strength", "long", -1, "a discrete preference strength 0..3 (Llama 2's scale); -1 = none"),
    BatchField("weight", "weight", "float", 1.0, "a per-comparison weight (e.g. annotator agreement)"),
    BatchField("tie", "tie", "bool", False, "the label says neither side is better"),
    BatchField(
        "group_weight", "group_weight", "float", 1.0, "1 / C(K,2) of the comparison's original group (eq 6)", False
    ),
)
RESPONSE_FIELDS = (
    BatchField("rank", "ranks", "float", NAN, "0 = best; equal ranks are ties; NaN = unranked"),
    BatchField("score", "scores", "float", NAN, "a per-response rating; NaN = none"),
    BatchField("true_reward", "true_rewards", "float", NAN, "the simulator's hidden truth; NaN = unknown"),
    BatchField("label", "labels", "float", NAN, "a pointwise correct (1) / incorrect (0) label; NaN = none"),
    BatchField(
        "spurious", "spurious", "float", NAN,
        "a known spurious feature of the response (the hackable simulator: its flattering sentences), which ODIN's "
        "second head can key on (loss.feature=spurious); NaN = unknown",
    ),
    BatchField(
        "critique_len", "critique_lens", "long", 0,
        "tokens of the critique (or rationale) that ends the row, its end tokens included (rmlab.models.reasoning); "
        "0 = none", False,
    ),
)


@dataclass
class Comparison:
    """One labelled comparison inside a group.

    winner/loser: response indices within the group (for a tie, the order carries no meaning).
    margin: a continuous margin (rating gap, judge-score gap, explicit margin field), or None.
    strength: a discrete preference strength 0..3 (Llama 2's scale: 3 = significantly better,
        0 = negligibly better / unsure), or None.
    weight: a per-comparison weight (e.g. annotator agreement); 1.0 by default.
    tie: True when the label says neither side is better.
    """

    winner: int
    loser: int
    margin: float | None = None
    strength: int | None = None
    weight: float = 1.0
    tie: bool = False


@dataclass
class PreferenceGroup:
    """One prompt with its responses and the comparisons among them."""

    prompt: str
    responses: list[str]
    comparisons: list[Comparison]
    group_id: str = ""
    ranks: list[float] | None = None  # 0 = best; equal ranks are ties; NaN = unranked
    scores: list[float] | None = None  # a per-response rating, when the data has one
    true_rewards: list[float] | None = None  # simulator only: the hidden truth
    attributes: list[list[float]] | None = None  # per-response, per-attribute ratings (NaN = missing)
    labels: list[float] | None = None  # pointwise correct (1) / incorrect (0) labels, NaN = none
    spurious: list[float] | None = None  # a known spurious feature per response (simulator: flattery), NaN = unknown
    # Per-response critique (or rationale) text, ``data.fields.critique``. A reasoning model's template appends it
    # to the response (after its cue); tokenization then counts its tokens (``critique_len``). "" = none.
    critiques: list[str] | None = None
    subset: str | None = None  # a section name (RewardBench-style per-subset accuracy)
    source: str = ""  # "file:line" of the record it came from, for error messages
    n_records: int = 1  # source records folded into this group (ratings data: one per response)
    # The texts were rendered by a chat template, specials included: prompt + response is the conversation's
    # exact template text, tokenized as is (rmlab.data.tokenize: the scoring contract).
    templated: bool = False

    def validate(self) -> None:
        k = len(self.responses)
        if k < 2 and not self._pointwise():
            raise ValueError(f"group {self.group_id!r} has {k} response(s); a group needs at least 2")
        for c in self.comparisons:
            if not (0 <= c.winner < k and 0 <= c.loser < k) or c.winner == c.loser:
                raise ValueError(f"group {self.group_id!r}: bad comparison {c}")

    def _pointwise(self) -> bool:
        return self.labels is not None or self.attributes is not None or self.scores is not None


@dataclass
class DataReport:
    """Accounts for every record: loaded = kept + sum(dropped.values()).

    Records are the units the source yields (a line of jsonl, a row of csv). Comparisons are
    counted too, because truncation can drop a comparison while keeping its record.
    """

    name: str = ""
    loaded: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    comparisons_loaded: int = 0
    comparisons_kept: int = 0
    comparisons_dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def drop_comparison(self, reason: str, n: int = 1) -> None:
        self.comparisons_dropped[reason] += n

    @property
    def balanced(self) -> bool:
        return self.loaded == self.kept + sum(self.dropped.values()) and (
            self.comparisons_loaded == self.comparisons_kept + sum(self.comparisons_dropped.values())
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "records": {
                "loaded": self.loaded,
                "kept": self.kept,
                "dropped": dict(self.dropped),
            },
            "comparisons": {
                "loaded": self.comparisons_loaded,
                "kept": self.comparisons_kept,
                "dropped": dict(self.comparisons_dropped),
            },
            "truncated": dict(self.truncated),
            "balanced": self.balanced,
            **self.extra,
        }

    def one_line(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        cdrops = ", ".join(f"{k}={v}" for k, v in sorted(self.comparisons_dropped.items())) or "none"
        return (
            f"[{self.name}] records loaded={self.loaded} kept={self.kept} dropped: {drops} | "
            f"comparisons loaded={self.comparisons_loaded} kept={self.comparisons_kept} dropped: {cdrops}"
        )


def finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
