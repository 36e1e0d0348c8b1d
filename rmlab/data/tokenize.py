"""Tokenization of preference groups, with an explicit truncation policy and a cache.

Each response row is ``start + prompt + mid + response + end`` where the special tokens come from the
tokenizer: an encoder gets ``[CLS] prompt [SEP] response [SEP]``; a causal LM gets
``<bos> prompt response <eos>`` (each only where the tokenizer has it). The prompt part is identical for
every response of a group, which is what lets a causal LM encode it once (prefix sharing).

Truncation policy (never silent; every cut is counted in the data report):
1. the reward is read at the end of the response, so a response keeps its *end*;
2. the prompt is left-truncated first (its end, next to the response, is kept), down to
   ``min_prompt_tokens``;
3. only then is a response left-truncated to fit;
4. a comparison whose two sides are identical after truncation is dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import field, make_dataclass
from pathlib import Path

from rmlab.data.types import COMPARISON_FIELDS, RESPONSE_FIELDS, DataReport, PreferenceGroup

NAN = float("nan")


class _TokenizedGroupMethods:
    @property
    def num_tokens(self) -> int:
        p = len(self.prompt_ids)
        return sum(p + len(r) for r in self.response_ids)

    @property
    def max_row(self) -> int:
        return len(self.prompt_ids) + max(len(r) for r in self.response_ids)

    @property
    def k(self) -> int:
        return len(self.response_ids)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


# A tokenized group: the shared prefix, the responses, the comparisons (winner/loser indices) and one list per
# declared field (rmlab.data.types): per comparison (margin, strength, ...) and per response (ranks, scores, ...).
# An empty list means "none given": collate fills it with the field's missing value.
TokenizedGroup = make_dataclass(
    "TokenizedGroup",
    [
        ("prompt_ids", list),  # start specials + prompt + mid specials: the shared prefix
        ("response_ids", list),  # response + end specials, one per response
        ("winner", list, field(default_factory=list)),
        ("loser", list, field(default_factory=list)),
        *[(f.group_name, list, field(default_factory=list)) for f in COMPARISON_FIELDS + RESPONSE_FIELDS],
        ("group_id", str, field(default="")),
        ("attributes", list, field(default_factory=list)),  # [K][A] per-attribute ratings, NaN = missing
        ("subset", str, field(default="")),
        ("parent", int, field(default=-1)),  # the original group's index when this is a sub-group of a split group
        ("n_records", int, field(default=1)),  # source records behind this group, for the data report
    ],
    bases=(_TokenizedGroupMethods,),
)
TokenizedGroup.__module__ = __name__  # picklable (DataLoader workers) under its module-level name


def special_tokens(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(start, mid, end) special tokens around prompt and response for this tokenizer."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is not None and sep is not None:  # BERT-style encoder
        return [cls], [sep], [sep]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([bos] if bos is not None else []), [], ([eos] if eos is not None else [])


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


CASTS = {"float": float, "long": int, "bool": bool}


def record_value(f, value):
    """A per-comparison value as the batch stores it: the field's missing value for None, else cast."""
    return f.missing if value is None else CASTS[f.dtype](value)


def _pad(values, k, fill):
    return list(values) if values is not None else [fill] * k


def tokenize_groups(
    groups: list[PreferenceGroup],
    tokenizer,
    report: DataReport,
    max_length: int = 512,
    min_prompt_tokens: int = 16,
) -> list[TokenizedGroup]:
    start, mid, end = special_tokens(tokenizer)
    fixed = len(start) + len(mid) + len(end)
    if max_length <= fixed + min_prompt_tokens:
        raise ValueError(
            f"data.max_length={max_length} leaves no room for a response after {fixed} special tokens and "
            f"data.min_prompt_tokens={min_prompt_tokens}; raise max_length or lower min_prompt_tokens"
        )
    prompts = _encode(tokenizer, [g.prompt for g in groups])
    flat = _encode(tokenizer, [r for g in groups for r in g.responses])
    out, pos = [], 0
    for g, p in zip(groups, prompts):
        resp = flat[pos : pos + len(g.responses)]
        pos += len(g.responses)
        resp = [r + end for r in resp]
        budget = max_length - len(start) - len(mid)
        longest = max(len(r) for r in resp)
        if len(p) + longest > budget:
            keep = max(min_prompt_tokens, budget - longest)
            if keep < len(p):
                p = p[len(p) - keep :] if keep > 0 else []
                report.truncated["prompt_left_truncated"] += 1
            room = budget - len(p)
            for i, r in enumerate(resp):
                if len(r) > room:
                    # Keep the end of the response: that is where the reward is read.
                    resp[i] = r[len(r) - room :]
                    report.truncated["response_left_truncated"] += 1
        keep_c = []
        report.comparisons_loaded += len(g.comparisons)
        for c in g.comparisons:
            if resp[c.winner] == resp[c.loser]:
                same_text = g.responses[c.winner] == g.responses[c.loser]
                report.drop_comparison("identical_responses" if same_text else "identical_after_truncation")
            else:
                keep_c.append(c)
        has_pointwise = g.labels is not None or g.attributes is not None
        if not keep_c and not has_pointwise:
            report.drop("no_comparison_left_after_truncation", g.n_records)
            report.kept -= g.n_records
            continue
        report.comparisons_kept += len(keep_c)
        n_orig = max(len(g.comparisons), 1)
        k = len(resp)
        out.append(
            TokenizedGroup(
                prompt_ids=start + p + mid,
                response_ids=resp,
                winner=[c.winner for c in keep_c],
                loser=[c.loser for c in keep_c],
                **{f.group_name: [record_value(f, getattr(c, f.name)) for c in keep_c] for f in COMPARISON_FIELDS if f.from_record},
                group_weight=[1.0 / n_orig] * len(keep_c),
                group_id=g.group_id,
                **{f.group_name: _pad(getattr(g, f.group_name), k, f.missing) for f in RESPONSE_FIELDS},
                attributes=list(g.attributes) if g.attributes is not None else [],
                subset=g.subset or "",
                n_records=g.n_records,
            )
        )
    return out


def subgroup(tg: TokenizedGroup, members: list[int], cis: list[int], group_id: str, parent: int) -> TokenizedGroup:
    """The responses ``members`` of ``tg`` (in that order) with its comparisons ``cis``, re-indexed."""
    local = {r: i for i, r in enumerate(members)}

    def pick(xs):
        return [xs[r] for r in members] if xs else []

    return TokenizedGroup(
        prompt_ids=tg.prompt_ids,
        response_ids=[tg.response_ids[r] for r in members],
        winner=[local[tg.winner[c]] for c in cis],
        loser=[local[tg.loser[c]] for c in cis],
        **{f.group_name: [getattr(tg, f.group_name)[c] for c in cis] if getattr(tg, f.group_name) else [] for f in COMPARISON_FIELDS},
        group_id=group_id,
        **{f.group_name: pick(getattr(tg, f.group_name)) for f in RESPONSE_FIELDS},
        attributes=pick(tg.attributes),
        subset=tg.subset,
        parent=parent,
    )


def split_group(tg: TokenizedGroup, max_responses: int, parent: int = -1) -> list[TokenizedGroup]:
    """Split a group with more than ``max_responses`` responses into sub-groups that fit a batch.

    Responses are cut into blocks of ``max_responses // 2``; each pair of blocks forms a sub-group, and
    every comparison is assigned to exactly one sub-group (the first that holds both its sides). No
    comparison is lost; a response may be forwarded in several sub-groups. ``group_weight`` keeps the
    original 1 / C so eq 6 balancing still weighs the whole prompt as one.
    """
    if tg.k <= max_responses:
        return [tg]
    if max_responses < 2:
        raise ValueError("a batch must hold at least 2 responses (data.max_responses >= 2)")
    half = max(1, max_responses // 2)
    blocks = [list(range(i, min(i + half, tg.k))) for i in range(0, tg.k, half)]
    block_of = {r: b for b, blk in enumerate(blocks) for r in blk}
    pairs = [(a, b) for a in range(len(blocks)) for b in range(a, len(blocks)) if a != b or len(blocks) == 1]
    assigned: dict[tuple[int, int], list[int]] = {}
    for ci, (w, lo) in enumerate(zip(tg.winner, tg.loser)):
        a, b = sorted((block_of[w], block_of[lo]))
        key = (a, b) if a != b else (a, a + 1 if a + 1 < len(blocks) else a - 1)
        key = tuple(sorted(key))
        assigned.setdefault(key, []).append(ci)
    subs = []
    for key in pairs:
        cis = assigned.get(key)
        if not cis:
            continue
        members = blocks[key[0]] + blocks[key[1]]
        subs.append(subgroup(tg, members, cis, f"{tg.group_id}#{key[0]}-{key[1]}", parent))
    return subs


def explode_pairs(tg: TokenizedGroup) -> list[TokenizedGroup]:
    """One K=2 group per comparison: the "shuffled comparisons" baseline InstructGPT compares eq 6 to.

    Each comparison becomes its own sample, so a prompt's comparisons scatter across batches and a
    response is forwarded once per comparison it is in (2 * C(K,2) forwards instead of K).
    ``group_weight`` keeps 1/C(K,2), so loss=grouped still weighs prompts alike.
    """
    return [
        subgroup(tg, [w, lo], [ci], f"{tg.group_id}/c{ci}", tg.parent)
        for ci, (w, lo) in enumerate(zip(tg.winner, tg.loser))
    ]


def cache_key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get("RMLAB_CACHE", Path.home() / ".cache" / "rmlab")) / "tokenized"


def load_cached(key: str):
    import torch

    path = cache_dir() / f"{key}.pt"
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        groups = [TokenizedGroup(**d) for d in blob["groups"]]
        return groups, blob["report"]
    except Exception:  # a stale or partial cache is rebuilt, never trusted
        return None


def save_cached(key: str, groups: list[TokenizedGroup], report: dict) -> None:
    import torch

    path = cache_dir() / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"groups": [g.to_dict() for g in groups], "report": report}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)
