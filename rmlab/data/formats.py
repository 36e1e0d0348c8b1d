"""Format adapters: records of one shape -> preference groups, with every record accounted for.

``data.format`` picks the adapter and ``data.fields`` maps the adapter's logical names to the
dataset's own field names (e.g. ``data.fields.chosen=output_1``); ``data.format_options`` tunes it.
Each adapter counts what it drops and why into the ``DataReport``; bad records raise a ``DataError``
naming file, line and field, or are counted as skips under ``data.on_error=skip``.

Formats (docs/data.md has an example of each):

- ``pairs``: prompt, chosen, rejected; or prompt, two responses and a label (or several annotators'
  labels) saying which side won.
- ``implicit_prompt``: HH-RLHF, whole conversations whose shared prefix is the prompt.
- ``chat``: role/content message lists, rendered with the tokenizer's chat template.
- ``ratings``: a score per response, one record per response (long form) or one record holding all
  responses (wide form); comparisons are built from the scores after grouping by prompt.
- ``rankings``: K responses in order (or with a rank each).
"""

from __future__ import annotations

import math
import reprlib
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from dataclasses import fields as dc_fields
from typing import Any

from rmlab.data.chat import DEFAULT_FALLBACK_TEMPLATE, check_messages, shared_turns, split_conversations, with_prompt
from rmlab.data.grouping import PAIRINGS, comparisons_from_scores, finish_rated, merge_by_prompt
from rmlab.data.sources import DataError, find_surrogate
from rmlab.data.types import Comparison, DataReport, PreferenceGroup

HH_ASSISTANT = "\n\nAssistant:"

# Numbers in data (margins, scores, ratings, ranks) must be finite and at most this large in absolute value.
# Batches are float32 (max 3.4e38): a value within +-1e30, the gap of two of them and a scaled margin stay
# finite there, where 1e308 - (-1e308) = inf would not. A value beyond it counts as non-finite.
MAX_ABS = 1e30


def in_range(x: float) -> bool:
    """Finite and within +-MAX_ABS: the rule every numeric field of a record is held to."""
    return math.isfinite(x) and abs(x) <= MAX_ABS


def _show(v: Any) -> str:
    """A short text of a value for an error message, safe for deeply nested lists."""
    return reprlib.repr(v) if isinstance(v, (list, dict, tuple)) else str(v)[:60]


# The adapter's logical names -> the dataset's field names. None = not used unless mapped.
# A value may be a list: prompt parts are joined (instruction + input), labels are annotators' votes.
DEFAULT_FIELDS: dict[str, dict[str, Any]] = {
    "pairs": {
        "prompt": "prompt",
        "chosen": "chosen",
        "rejected": "rejected",
        "margin": None,
        "strength": None,
        "label": None,
        "chosen_score": None,
        "rejected_score": None,
        "subset": None,
    },
    "implicit_prompt": {"chosen": "chosen", "rejected": "rejected", "margin": None, "subset": None},
    "chat": {
        "prompt": None,
        "chosen": "chosen",
        "rejected": "rejected",
        "margin": None,
        "chosen_score": None,
        "rejected_score": None,
        "subset": None,
    },
    "ratings": {
        "prompt": "prompt",
        "response": "response",
        "score": "score",
        "responses": None,
        "scores": None,
        "attributes": None,
        "critique": None,
        "subset": None,
    },
    "rankings": {"prompt": "prompt", "responses": "responses", "ranks": None, "subset": None},
}


# The fields that may list several names: text read with Field.text (parts joined), labels (votes) and
# attribute ratings. Any other field names exactly one.
MULTI_FIELDS: dict[str, set[str]] = {
    "pairs": {"prompt", "chosen", "rejected", "subset", "label"},
    "implicit_prompt": {"chosen", "rejected", "subset"},
    "chat": {"subset"},
    "ratings": {"prompt", "response", "subset", "attributes"},
    "rankings": {"prompt", "subset"},
}


@dataclass
class FormatOptions:
    """``data.format_options``: every key the adapters read, so a typo is an error, not a no-op."""

    join: str = "\n\n"  # separator when data.fields.prompt lists several fields (instruction + input)
    label_map: dict | None = None  # raw label -> first|second|tie, for labels parse_winner does not know
    extract: dict | None = None  # {logical field: [after marker, before marker or null]}: cut text out of a field
    group_by_prompt: bool = False  # pairs/chat: fold records with the same prompt into one group (eq 6)
    pairing: str = "all"  # ratings/rankings: all | best_vs_rest | adjacent
    tie_eps: float = 0.0  # ratings: |score gap| <= this is a tie
    max_k: int | None = None  # ratings: at most this many responses per prompt (the rest are counted drops)
    max_k_strategy: str = "spread"  # random | spread (evenly over the score range)
    score_reduce: str = "mean"  # several grades for one response (a list) -> mean | median | min | max
    score_offset: float = 0.0  # added to every score (AlpacaEval: preference - 1); gaps do not change
    higher_is_better: bool = True  # rankings with a ranks field: False when rank 1 is the best
    max_prompts: int | None = None  # keep the first N prompts (their records); the rest are counted drops
    critique_index: int = 0  # ratings: a critique field holding a list (Prometheus' three GPT-4 critiques): this one
    fallback_template: str = DEFAULT_FALLBACK_TEMPLATE  # chat: jinja template when the tokenizer has none
    tokenizer: Any = None  # chat: passed in by the data module, not set in yaml

    @classmethod
    def build(cls, options: dict) -> FormatOptions:
        known = {f.name for f in dc_fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown data.format_options {unknown}; known: {sorted(known - {'tokenizer'})}")
        opts = cls(**options)
        for name in ("score_offset", "tie_eps"):
            x = getattr(opts, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not in_range(float(x)):
                raise ValueError(f"data.format_options.{name}={x!r} must be a finite number within +-{MAX_ABS:g}")
        if opts.pairing not in PAIRINGS:
            raise ValueError(f"data.format_options.pairing={opts.pairing!r} is not one of {PAIRINGS}")
        if opts.score_reduce not in REDUCERS:
            raise ValueError(f"data.format_options.score_reduce={opts.score_reduce!r} is not one of {sorted(REDUCERS)}")
        return opts


REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "mean": statistics.fmean,
    "median": statistics.median,
    "min": min,
    "max": max,
}


READ = object()  # Field.number(value=READ): read the mapped field (None is a value: a missing one)


class Field:
    """Reads mapped fields from one record, with errors that say where and what to set."""

    def __init__(self, rec: Any, where: str, fields: dict[str, Any], opts: FormatOptions | None = None):
        if not isinstance(rec, dict):
            raise DataError(
                where, f"a record must be an object, got {type(rec).__name__}", "each line must be a JSON object"
            )
        self.rec, self.where, self.fields = rec, where, fields
        self.opts = opts or FormatOptions()

    def name(self, key: str) -> Any:
        return self.fields.get(key)

    def _missing(self, key: str, name: Any) -> DataError:
        present = ", ".join(sorted(map(str, self.rec))) or "(none)"
        what = f"missing field {name!r}" if name is not None else "no field mapped"
        return DataError(
            self.where,
            f"{what} (the {key!r} field of this format)",
            f"fields present: {present}; set data.fields.{key}=<one of them>",
        )

    def raw(self, key: str, required: bool = True) -> Any:
        name = self.fields.get(key)
        if name is None or name not in self.rec or self.rec[name] is None:
            if not required:
                return None
            if name is not None and name in self.rec:  # present, but null: not the same as missing
                raise DataError(
                    self.where,
                    f"field {name!r} is null (the {key!r} field of this format)",
                    f"fill it in, map another field with data.fields.{key}=..., or set data.on_error=skip",
                )
            raise self._missing(key, name)
        return self.rec[name]

    def text(self, key: str, required: bool = True) -> str | None:
        name = self.fields.get(key)
        if isinstance(name, (list, tuple)):  # several fields joined: instruction + input
            parts = [Field(self.rec, self.where, {key: n}).text(key, required=False) for n in name]
            if required and all(p is None for p in parts):
                raise self._missing(key, list(name))
            v = self.opts.join.join(p for p in parts if p and p.strip())
        else:
            v = self.raw(key, required)
            if v is None:
                return None
            if not isinstance(v, str):
                raise DataError(
                    self.where,
                    f"field {name!r} must be a string, got {type(v).__name__}",
                    f"map data.fields.{key} to a text field, or fix the record",
                )
            check_text(v, self.where, name)
        return self._extract(key, v)

    def _extract(self, key: str, v: str) -> str:
        rule = (self.opts.extract or {}).get(key)
        if not rule:
            return v
        after, before = (list(rule) + [None])[:2]
        i = v.find(after) if after else 0
        if i < 0:
            raise DataError(
                self.where,
                f"field {self.fields[key]!r} has no {after!r} marker to cut the {key} from",
                f"fix data.format_options.extract.{key}, or set data.on_error=skip",
            )
        i += len(after or "")
        j = v.find(before, i) if before else len(v)
        if j < 0:
            raise DataError(
                self.where,
                f"field {self.fields[key]!r} has no {before!r} marker after {after!r}",
                f"fix data.format_options.extract.{key}, or set data.on_error=skip",
            )
        return v[i:j].strip()

    def number(self, key: str, required: bool = True, value: Any = READ) -> float | None:
        """The field as a float; a list of grades (score fields) is reduced with ``score_reduce``.

        A list with a grade that is not finite (or beyond +-MAX_ABS) gives NaN: the adapter counts the
        record as non-finite, as for a single such value, instead of reducing inf or overflowing.
        """
        v = self.raw(key, required) if value is READ else value
        if isinstance(v, list) and v and key in ("score", "scores"):  # several graders: reduce
            grades = [self.scalar(key, x, in_list=True) for x in v]
            if not all(in_range(x) for x in grades):
                return math.nan
            return float(REDUCERS[self.opts.score_reduce](grades))
        return self.scalar(key, v, required)

    def scalar(self, key: str, v: Any, required: bool = True, in_list: bool = False) -> float | None:
        """One value as a float: a number, or a string holding one; never a list, a bool or null."""
        name = self.fields.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            if required:
                what = "has an empty value in its list" if in_list else "is empty"
                raise DataError(self.where, f"field {name!r} {what}", "fill it in, or set data.on_error=skip")
            return None
        try:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise ValueError
            return float(v)
        except OverflowError:  # an integer beyond float range: as non-finite as 1e400, which parses to inf
            return math.inf if v > 0 else -math.inf
        except (TypeError, ValueError):
            raise DataError(
                self.where,
                f"field {name!r} = {_show(v)!r} is not a number",
                "fix the value, map another field, or set data.on_error=skip",
            ) from None

    def critique(self) -> str:
        """``data.fields.critique``: a text, or a list of them (one is read: ``critique_index``); ``extract``
        applies. A missing or null critique is "" (none), so partly critiqued data trains."""
        v = self.raw("critique", required=False)
        if isinstance(v, list):
            i = self.opts.critique_index
            if not v:
                return ""
            if not -len(v) <= i < len(v):
                raise DataError(
                    self.where,
                    f"field {self.fields['critique']!r} holds {len(v)} critiques; critique_index={i} is outside it",
                    "set data.format_options.critique_index to a valid index, or set data.on_error=skip",
                )
            v = v[i]
        if v is None:
            return ""
        if not isinstance(v, str):
            raise DataError(
                self.where,
                f"field {self.fields['critique']!r} must be a text or a list of texts, got {type(v).__name__}",
                "map data.fields.critique to a text field, or fix the record",
            )
        check_text(v, self.where, self.fields["critique"])
        return self._extract("critique", v) if v.strip() else ""

    def optional_number(self, key: str) -> float | None:
        return self.number(key, required=False) if self.name(key) else None

    def attribute_ratings(self) -> list[float]:
        """The per-attribute ratings of one response (``data.fields.attributes``: a list of field names,
        in the order of ``model.head_options.attributes``). Missing or null = NaN, masked in the loss;
        a list of grades is reduced like a score (``score_reduce``)."""
        names = self.name("attributes")
        names = [names] if isinstance(names, str) else list(names)
        out = []
        for n in names:
            v = self.rec.get(n)
            if v is None or (isinstance(v, list) and not v):
                out.append(float("nan"))
                continue
            sub = Field(self.rec, self.where, {"score": n}, self.opts)
            x = sub.number("score", value=v)
            if not in_range(x):
                raise DataError(
                    self.where,
                    f"attribute field {n!r} = {_show(v)!r} is not finite (or beyond +-{MAX_ABS:g})",
                    "fix it, or set data.on_error=skip",
                )
            out.append(x)
        return out


def check_text(v: str, where: str, name: Any) -> None:
    """Text with a lone surrogate (JSON can spell ``"\\ud800"``) is not valid Unicode: no tokenizer
    or UTF-8 writer accepts it, so the record is malformed. (``read_records`` checks every field of a
    file's records already; this covers records handed to the adapters directly.)"""
    i = find_surrogate(v)
    if i >= 0:
        raise DataError(
            where,
            f"field {name!r} holds a lone surrogate ({ascii(v[i])} at character {i}), which is not valid Unicode text",
            "fix the text where the file was written (a surrogate pair split in two), or set data.on_error=skip",
        )


WINNER_TABLE: dict[str, int | None] = {
    "1": 0,
    "2": 1,
    "1.0": 0,
    "2.0": 1,
    "A": 0,
    "B": 1,
    "A>B": 0,
    "B>A": 1,
    "B<A": 0,
    "A<B": 1,
    "0": None,
    "0.0": None,
    "TIE": None,
    "A=B": None,
    "FIRST": 0,
    "SECOND": 1,
}
SIDES = {"first": 0, "second": 1, "tie": None}


def parse_winner(v: Any, where: str, field: str, label_map: dict | None = None) -> int | None:
    """A 'which side won' label -> 0 (first), 1 (second) or None (tie).

    Accepts 1|2 (0 = tie), A|B, A>B|B>A|A=B, first|second|tie; ``label_map`` (raw -> first|second|tie)
    covers any other convention, e.g. 0/1 labels where 0 means the first side.
    """
    if isinstance(v, (list, dict)):
        raise DataError(
            where,
            f"label {field!r} = {_show(v)} is a {type(v).__name__}, not a label",
            "map data.fields.label to a field holding 1|2|0, A|B, A>B|B>A|A=B or first|second|tie",
        )
    if label_map:
        hit = label_map.get(str(v).strip(), label_map.get(v) if isinstance(v, (int, str)) else None)
        if hit is not None:
            if hit not in SIDES:
                raise ValueError(f"data.format_options.label_map values must be first|second|tie, got {hit!r}")
            return SIDES[hit]
    s = str(v).strip().upper().replace(" ", "")
    if s not in WINNER_TABLE:
        raise DataError(
            where,
            f"label {field!r} = {v!r} is not one of 1|2|0(tie), A|B, A>B|B>A|A=B",
            "map other labels with data.format_options.label_map={raw: first|second|tie}",
        )
    return WINNER_TABLE[s]


def votes_to_comparison(sides: list[int | None]) -> tuple[int | None, int, float]:
    """Several annotators' labels -> (winning side or None for a tie, strength, agreement margin).

    The side with more votes wins; equal votes (or all ties) make a tie. strength = |votes A - votes B|
    (3 annotators: 3:0 -> 3, 2:1 -> 1, 2:0 with one tie -> 2), capped at 3 (Llama 2's scale);
    margin = that difference over the number of annotators (1.0 unanimous, 0.33 for 2:1).
    """
    a, b = sides.count(0), sides.count(1)
    if a == b:
        return None, 0, 0.0
    return (0 if a > b else 1), min(3, abs(a - b)), abs(a - b) / len(sides)


def _label(f: Field) -> tuple[bool, bool, int | None, float | None]:
    """(present, swap, strength, margin) from data.fields.label (one field, a list of fields, or a list value)."""
    name = f.name("label")
    if not name:
        return False, False, None, None
    if isinstance(name, (list, tuple)):
        raws = [Field(f.rec, f.where, {"label": n}).raw("label") for n in name]
        names = list(name)
    else:
        raw = f.raw("label")
        raws, names = (raw, [name] * len(raw)) if isinstance(raw, list) else ([raw], [name])
    sides = [parse_winner(r, f.where, n, f.opts.label_map) for r, n in zip(raws, names)]
    if len(sides) == 1:
        return True, sides[0] == 1, None, None if sides[0] is not None else 0.0
    side, strength, margin = votes_to_comparison(sides)
    return True, side == 1, strength, margin


# Format characters that render as nothing: a response made only of these (and whitespace) has no
# content, though ``str.strip`` keeps them (they are not whitespace).
INVISIBLE = "\u00ad\u180e\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff"
_NO_INVISIBLE = str.maketrans("", "", INVISIBLE)


def is_blank(text: str) -> bool:
    """True for a text of whitespace and invisible characters only (zero width space, joiners, BOM...)."""
    return not text.translate(_NO_INVISIBLE).strip()


def _drop_reason(a: str, b: str, margin: float | str | None) -> str | None:
    """Why a well-formed pair is dropped, or None. ``margin`` may already be a reason (a non-finite number)."""
    if is_blank(a) or is_blank(b):
        return "empty_response"
    if a == b:
        return "identical_chosen_rejected"
    if isinstance(margin, str):
        return margin
    if margin is not None and not math.isfinite(margin):  # the fields were range-checked: this is a last guard
        return "nonfinite_margin"
    return None


def _margin(f: Field) -> float | str | None:
    """The margin field, or the reason ``nonfinite_margin`` when it is not finite (or beyond +-MAX_ABS)."""
    m = f.optional_number("margin")
    return "nonfinite_margin" if m is not None and not in_range(m) else m


def _score_margin(f: Field) -> float | str | None:
    """chosen_score - rejected_score when both are mapped (UltraFeedback binarized), else the margin field.

    A score that is not finite (or beyond +-MAX_ABS) gives the reason ``nonfinite_score`` instead.
    """
    if f.name("chosen_score") and f.name("rejected_score"):
        c, r = f.number("chosen_score"), f.number("rejected_score")
        return c - r if in_range(c) and in_range(r) else "nonfinite_score"
    return _margin(f)


def _side_scores(f: Field) -> bool:
    """Whether the margin is chosen_score - rejected_score: scores that belong to the two sides."""
    return bool(f.name("chosen_score") and f.name("rejected_score"))


def _pair_group(
    f: Field,
    prompt: str,
    a: str,
    b: str,
    margin: float | str | None,
    strength: float | None = None,
    templated: bool = False,
) -> PreferenceGroup | str:
    """One pair; a label saying the second side won swaps the sides. Scores of the sides
    (chosen_score/rejected_score) travel with their responses, so the margin is negated with them; a
    margin field is the winner's margin and is kept."""
    labelled, swap, votes_strength, votes_margin = _label(f)
    tie = labelled and votes_margin == 0.0
    if swap:
        a, b = b, a
        if isinstance(margin, float) and _side_scores(f):
            margin = -margin
    if labelled and margin is None:
        margin = votes_margin if votes_strength is not None else None
        strength = votes_strength if strength is None else strength
    reason = _drop_reason(a, b, margin)
    if reason:
        return reason
    if margin is not None and margin < 0:
        return "scores_contradict_label"
    return PreferenceGroup(
        prompt=prompt,
        responses=[a, b],
        comparisons=[Comparison(0, 1, margin=margin, strength=None if strength is None else int(strength), tie=tie)],
        subset=f.text("subset", required=False) if f.name("subset") else None,
        source=f.where,
        templated=templated,
        group_id=f.where,
    )


STRENGTHS = (0, 1, 2, 3)  # Llama 2's scale: 0 negligibly better / unsure ... 3 significantly better


def _strength(f: Field) -> int | None:
    """data.fields.strength, checked here: a level outside 0..3 would otherwise fail only in the loss."""
    v = f.optional_number("strength")
    if v is None:
        return None
    if v not in STRENGTHS:
        raise DataError(
            f.where,
            f"field {f.fields['strength']!r} = {f.rec[f.fields['strength']]!r} is not a strength 0..3",
            "strength is Llama 2's 0-3 scale (3 = significantly better): fix the value, map another field with "
            "data.fields.strength, or set data.on_error=skip",
        )
    return int(v)


def adapt_pairs(f: Field) -> PreferenceGroup | str:
    prompt = f.text("prompt")
    return _pair_group(f, prompt, f.text("chosen"), f.text("rejected"), _score_margin(f), _strength(f))


def split_implicit_prompt(chosen: str, rejected: str, marker: str = HH_ASSISTANT) -> tuple[str, str, str]:
    """HH-RLHF: the prompt is the shared prefix up to and including the last assistant marker.

    The cut is at the last ``marker`` that lies inside the common prefix, so both responses are the
    text after it (the final assistant turn).
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(marker, 0, n)  # the whole marker must lie inside the shared prefix
    if cut < 0:
        return "", chosen, rejected
    cut += len(marker)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def adapt_implicit_prompt(f: Field) -> PreferenceGroup | str:
    prompt, a, b = split_implicit_prompt(f.text("chosen"), f.text("rejected"))
    if not prompt:
        return "no_shared_assistant_prefix"
    return _pair_group(f, prompt, a, b, _margin(f))


def adapt_chat(f: Field) -> PreferenceGroup | str:
    chosen = check_messages(f.raw("chosen"), f.where, f.fields["chosen"])
    rejected = check_messages(f.raw("rejected"), f.where, f.fields["rejected"])
    head = f.raw("prompt", required=False) if f.name("prompt") else None
    chosen = with_prompt(head, chosen, f.where, f.fields.get("prompt"))
    rejected = with_prompt(head, rejected, f.where, f.fields.get("prompt"))
    n = shared_turns([chosen, rejected])
    if not n:
        return "no_shared_prompt"
    for conv, side in ((chosen, "chosen"), (rejected, "rejected")):  # message contents
        check_text("".join(m["content"] for m in conv), f.where, f.fields[side])
        if is_blank("".join(m["content"] for m in conv[n:])):  # the rendered turn carries markup, so check here
            return "empty_response"
    prompt, (a, b) = split_conversations([chosen, rejected], f.opts.tokenizer, f.opts.fallback_template, f.where)
    return _pair_group(f, prompt, a, b, _score_margin(f), templated=True)


def _list(f: Field, key: str) -> list:
    v = f.raw(key)
    if not isinstance(v, list):
        raise DataError(
            f.where,
            f"field {f.fields[key]!r} must be a list, got {type(v).__name__}",
            f"map data.fields.{key} to a list field",
        )
    return v


def _texts(f: Field, items: list, key: str) -> list[str]:
    out = []
    for i, r in enumerate(items):
        if isinstance(r, dict):  # [{"response": ..., "score": ...}, ...]
            names = {"response": "response", **{k: v for k, v in f.fields.items() if v is not None}}
            r = Field(r, f"{f.where} {f.fields[key]}[{i}]", names, f.opts).text("response")
        if not isinstance(r, str):
            raise DataError(
                f.where,
                f"field {f.fields[key]!r}[{i}] must be a string, got {type(r).__name__}",
                f"data.fields.{key} must hold a list of texts (or of objects with data.fields.response)",
            )
        check_text(r, f.where, f"{f.fields[key]}[{i}]")
        out.append(r)
    return out


def adapt_ratings(f: Field) -> PreferenceGroup | str:
    """One scored response (long form), or all of them (wide form: data.fields.responses is mapped).

    Comparisons are built later, per prompt, in ``records_to_groups``.
    """
    prompt = f.text("prompt")
    if f.name("responses"):
        items = _list(f, "responses")
        responses = _texts(f, items, "responses")
        if f.name("scores"):
            raw = _list(f, "scores")
            if len(raw) != len(items):
                raise DataError(
                    f.where,
                    f"{len(items)} responses but {len(raw)} scores",
                    "each response needs one score; fix the record or set data.on_error=skip",
                )
        else:
            raw = [Field(r, f.where, f.fields, f.opts).raw("score") if isinstance(r, dict) else None for r in items]
        scores = [f.number("scores" if f.name("scores") else "score", value=s) for s in raw]
    else:
        responses, scores = [f.text("response")], [f.number("score")]
    attributes = None
    if f.name("attributes"):
        if f.name("responses"):
            raise DataError(
                f.where,
                "data.fields.attributes reads one response per record (long form)",
                "unset data.fields.responses, or drop data.fields.attributes",
            )
        attributes = [f.attribute_ratings()]
    critiques = None
    if f.name("critique"):
        if f.name("responses"):
            raise DataError(
                f.where,
                "data.fields.critique reads one response per record (long form)",
                "unset data.fields.responses, or drop data.fields.critique",
            )
        critiques = [f.critique()]
    if any(is_blank(r) for r in responses):
        return "empty_response"
    if not all(in_range(s) for s in scores):
        return "nonfinite_score"
    if len(set(responses)) < len(responses):
        return "identical_responses_in_record"
    return PreferenceGroup(
        prompt=prompt,
        responses=responses,
        comparisons=[],
        scores=[s + f.opts.score_offset for s in scores],
        attributes=attributes,
        critiques=critiques,
        subset=f.text("subset", required=False) if f.name("subset") else None,
        source=f.where,
        group_id=f.where,
    )


def adapt_rankings(f: Field) -> PreferenceGroup | str:
    """K responses best first, or with a rank each (data.fields.ranks; lower is better unless told)."""
    prompt = f.text("prompt")
    responses = _texts(f, _list(f, "responses"), "responses")
    if f.name("ranks") and f.raw("ranks", required=False) is not None:  # a record without ranks is in order
        ranks = [f.scalar("ranks", r, in_list=True) for r in _list(f, "ranks")]
        if len(ranks) != len(responses):
            raise DataError(
                f.where, f"{len(responses)} responses but {len(ranks)} ranks", "each response needs one rank"
            )
        if f.opts.higher_is_better:
            ranks = [-r for r in ranks]
    else:
        ranks = [float(i) for i in range(len(responses))]
    if len(responses) < 2:
        return "single_response_prompt"
    if any(is_blank(r) for r in responses):
        return "empty_response"
    if len(set(responses)) < len(responses):
        return "identical_responses_in_record"
    if not all(in_range(r) for r in ranks):
        return "nonfinite_rank"
    # Dense 0-based ranks (0 = best), equal values share a rank: the Plackett-Luce input.
    levels = sorted(set(ranks))
    dense = [float(levels.index(r)) for r in ranks]
    return PreferenceGroup(
        prompt=prompt,
        responses=responses,
        ranks=dense,
        comparisons=comparisons_from_scores([-r for r in dense], f.opts.pairing, 0.0, with_margin=False),
        subset=f.text("subset", required=False) if f.name("subset") else None,
        source=f.where,
        group_id=f.where,
    )


ADAPTERS: dict[str, Callable[[Field], PreferenceGroup | str]] = {
    "pairs": adapt_pairs,
    "implicit_prompt": adapt_implicit_prompt,
    "chat": adapt_chat,
    "ratings": adapt_ratings,
    "rankings": adapt_rankings,
}


def skip_reason(e: DataError) -> str:
    """A short, stable drop reason for a skipped bad record (the report groups by it)."""
    return "bad_record: " + e.problem.split(" (")[0].split(" = ")[0][:60]


def records_to_groups(
    records: Iterable[tuple[str, Any]],
    fmt: str,
    fields: dict | None,
    report: DataReport,
    on_error: str = "raise",
    max_records: int | None = None,
    **options: Any,
) -> list[PreferenceGroup]:
    """Adapt every record, deduplicate, fold by prompt where the format needs it, and count it all.

    ``options`` are ``data.format_options`` (see ``FormatOptions``). Every loaded record ends up kept
    (in a group's ``n_records``) or in ``report.dropped`` under a reason.
    """
    if fmt not in ADAPTERS:
        raise ValueError(f"data.format={fmt!r} is not one of {sorted(ADAPTERS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be raise|skip, got {on_error!r}")
    # A null mapping means "the format's default name": a generic config can list every key as null.
    fields = {k: v for k, v in (fields or {}).items() if v is not None}
    unknown = sorted(set(fields) - set(DEFAULT_FIELDS[fmt]))
    if unknown:
        raise ValueError(
            f"data.fields {unknown} mean nothing to data.format={fmt}; it reads {sorted(DEFAULT_FIELDS[fmt])}"
        )
    several = sorted(k for k, v in fields.items() if isinstance(v, (list, tuple)) and k not in MULTI_FIELDS[fmt])
    if several:
        raise ValueError(
            f"data.fields {several} must each name one field for data.format={fmt}; "
            f"only {sorted(MULTI_FIELDS[fmt])} may list several"
        )
    opts = FormatOptions.build(options)
    mapping = {**DEFAULT_FIELDS[fmt], **fields}
    adapter = ADAPTERS[fmt]
    groups, seen = [], set()
    for where, rec in records:
        if max_records is not None and report.loaded >= max_records:
            break
        report.loaded += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            out = adapter(Field(rec, where, mapping, opts))
        except DataError as e:
            if on_error == "raise":
                raise
            report.drop(skip_reason(e))
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
    if fmt == "ratings" or opts.group_by_prompt:
        groups = merge_by_prompt(groups, report)
        ks = [len(g.responses) for g in groups]
        # K per prompt as the source has it, before max_k: the data report's "K per prompt" is after.
        report.extra["source_k_per_prompt"] = {"min": min(ks, default=0), "max": max(ks, default=0), "prompts": len(ks)}
    if opts.max_prompts is not None:
        for g in groups[opts.max_prompts :]:
            report.drop("beyond_max_prompts", g.n_records)
            report.kept -= g.n_records
        groups = groups[: opts.max_prompts]
    if fmt == "ratings":
        long_form = not mapping.get("responses")
        done = (
            finish_rated(g, report, opts.pairing, opts.tie_eps, opts.max_k, opts.max_k_strategy, long_form)
            for g in groups
        )
        groups = [g for g in done if g is not None]
    for g in groups:
        g.validate()
    return groups
