"""Format adapters: records of one shape -> preference groups, with every record accounted for.

``data.format`` picks the adapter and ``data.fields`` maps the adapter's logical names to the
dataset's own field names (e.g. ``data.fields.chosen=output_1``). Each adapter counts what it drops
and why into the ``DataReport``; bad records raise a ``DataError`` naming file, line and field, or are
counted as skips under ``data.on_error=skip``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from rmlab.data.sources import DataError
from rmlab.data.types import Comparison, DataReport, PreferenceGroup

HH_ASSISTANT = "\n\nAssistant:"

DEFAULT_FIELDS: dict[str, dict[str, str | None]] = {
    "pairs": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "margin": None, "strength": None, "label": None, "subset": None},
    "implicit_prompt": {"chosen": "chosen", "rejected": "rejected", "margin": None, "subset": None},
}


class Field:
    """Reads mapped fields from one record, with errors that say where and what to set."""

    def __init__(self, rec: Any, where: str, fields: dict[str, str | None]):
        if not isinstance(rec, dict):
            raise DataError(where, f"a record must be an object, got {type(rec).__name__}", "each line must be a JSON object")
        self.rec, self.where, self.fields = rec, where, fields

    def name(self, key: str) -> str | None:
        return self.fields.get(key)

    def raw(self, key: str, required: bool = True) -> Any:
        name = self.fields.get(key)
        if name is None or name not in self.rec or self.rec[name] is None:
            if not required:
                return None
            present = ", ".join(sorted(map(str, self.rec))) or "(none)"
            raise DataError(
                self.where,
                f"missing field {name!r} (the {key!r} field of this format)",
                f"fields present: {present}; set data.fields.{key}=<one of them>",
            )
        return self.rec[name]

    def text(self, key: str, required: bool = True) -> str | None:
        v = self.raw(key, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise DataError(self.where, f"field {self.fields[key]!r} must be a string, got {type(v).__name__}", f"map data.fields.{key} to a text field")
        return v

    def number(self, key: str, required: bool = True) -> float | None:
        v = self.raw(key, required)
        if v is None or (isinstance(v, str) and not v.strip()):
            if required:
                raise DataError(self.where, f"field {self.fields[key]!r} is empty")
            return None
        try:
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        except (TypeError, ValueError):
            raise DataError(self.where, f"field {self.fields[key]!r} = {v!r} is not a number", "fix the value or set data.on_error=skip") from None


def parse_winner(v: Any, where: str, field: str) -> int | None:
    """A 'which side won' label -> 0 (first), 1 (second) or None (tie).

    Accepts 1|2, 0|1 with ``zero_based``-free semantics resolved as: 1 -> first, 2 -> second,
    0 -> tie; 'A'|'B'; 'A>B'|'B>A'|'A=B'; 'tie'.
    """
    s = str(v).strip().upper().replace(" ", "")
    table = {"1": 0, "2": 1, "A": 0, "B": 1, "A>B": 0, "B>A": 1, "B<A": 0, "A<B": 1, "0": None, "TIE": None, "A=B": None, "1.0": 0, "2.0": 1, "0.0": None}
    if s not in table:
        raise DataError(where, f"label {field!r} = {v!r} is not one of 1|2|0(tie), A|B, A>B|B>A|A=B")
    return table[s]


def _check_comparison(report: DataReport, chosen: str, rejected: str, margin: float | None) -> str | None:
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if chosen == rejected:
        return "identical_chosen_rejected"
    if margin is not None and not math.isfinite(margin):
        return "nonfinite_margin"
    return None


def adapt_pairs(rec: Any, where: str, fields: dict, report: DataReport, **_: Any) -> PreferenceGroup | str:
    f = Field(rec, where, fields)
    prompt = f.text("prompt")
    a, b = f.text("chosen"), f.text("rejected")
    margin = f.number("margin", required=False) if f.name("margin") else None
    strength = f.number("strength", required=False) if f.name("strength") else None
    tie = False
    if f.name("label"):
        side = parse_winner(f.raw("label"), where, fields["label"])
        tie = side is None
        if side == 1:
            a, b = b, a
    reason = _check_comparison(report, a, b, margin)
    if reason:
        return reason
    subset = f.text("subset", required=False) if f.name("subset") else None
    return PreferenceGroup(
        prompt=prompt,
        responses=[a, b],
        comparisons=[Comparison(0, 1, margin=margin, strength=None if strength is None else int(strength), tie=tie)],
        subset=subset,
        source=where,
    )


def split_implicit_prompt(chosen: str, rejected: str, marker: str = HH_ASSISTANT) -> tuple[str, str, str]:
    """HH-RLHF: the prompt is the shared prefix up to and including the last assistant marker.

    The cut is at the last ``marker`` that lies inside the common prefix, so both responses are the
    text after it (the final assistant turn).
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(marker, 0, n - len(marker) + 1 if n >= len(marker) else 0)
    if cut < 0:
        return "", chosen, rejected
    cut += len(marker)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def adapt_implicit_prompt(rec: Any, where: str, fields: dict, report: DataReport, **_: Any) -> PreferenceGroup | str:
    f = Field(rec, where, fields)
    chosen, rejected = f.text("chosen"), f.text("rejected")
    prompt, a, b = split_implicit_prompt(chosen, rejected)
    if not prompt:
        return "no_shared_assistant_prefix"
    margin = f.number("margin", required=False) if f.name("margin") else None
    reason = _check_comparison(report, a, b, margin)
    if reason:
        return reason
    return PreferenceGroup(prompt=prompt, responses=[a, b], comparisons=[Comparison(0, 1, margin=margin)], source=where)


ADAPTERS: dict[str, Callable] = {"pairs": adapt_pairs, "implicit_prompt": adapt_implicit_prompt}


def records_to_groups(
    records: Iterable[tuple[str, Any]],
    fmt: str,
    fields: dict | None,
    report: DataReport,
    on_error: str = "raise",
    max_records: int | None = None,
    **options: Any,
) -> list[PreferenceGroup]:
    """Run one record-at-a-time adapter over a source, deduplicating and counting every record.

    ``options`` (``data.format_options``) are passed to the adapter.
    """
    if fmt not in ADAPTERS:
        raise ValueError(f"data.format={fmt!r} is not one of {sorted(ADAPTERS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be raise|skip, got {on_error!r}")
    mapping = {**DEFAULT_FIELDS.get(fmt, {}), **(fields or {})}
    adapter = ADAPTERS[fmt]
    groups, seen = [], set()
    for where, rec in records:
        if max_records is not None and report.loaded >= max_records:
            break
        report.loaded += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            out = adapter(rec, where, mapping, report, **options)
        except DataError as e:
            if on_error == "raise":
                raise
            report.drop(f"bad_record: {e.problem.split(' (')[0][:60]}")
            continue
        if isinstance(out, str):
            report.drop(out)
            continue
        key = (out.prompt, tuple(out.responses))
        if key in seen:
            report.drop("duplicate")
            continue
        seen.add(key)
        report.kept += 1
        groups.append(out)
    return groups
