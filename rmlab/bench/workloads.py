"""Benchmark workloads: the same comparisons, as rmlab groups and as TRL's chosen/rejected rows.

Each workload is a list of ``TokenizedGroup`` built by rmlab's own pipeline (format adapter ->
``tokenize_groups``), pre-filtered so that every row fits ``max_length`` whole: neither side
truncates or drops anything. TRL gets one ``(prompt + chosen, prompt + rejected)`` row pair per
comparison, with exactly the token ids rmlab forwards.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from rmlab.data.formats import records_to_groups
from rmlab.data.simulator import SimulatorConfig, generate
from rmlab.data.sources import read_records
from rmlab.data.tokenize import TokenizedGroup, special_tokens, tokenize_groups
from rmlab.data.types import Comparison, DataReport, PreferenceGroup

HH_FILE = "hh_rlhf_harmless/test.jsonl.gz"
ALPACA_FILE = "alpaca_eval2/weighted_alpaca_eval_gpt4_turbo.annotations.jsonl.gz"


def _fits(tok, groups: list[PreferenceGroup], max_length: int) -> list[PreferenceGroup]:
    """Keep groups whose every row (specials + prompt + response) fits ``max_length`` untruncated."""
    start, mid, end = special_tokens(tok)
    fixed = len(start) + len(mid) + len(end)
    p_len = [len(x) for x in tok([g.prompt for g in groups], add_special_tokens=False)["input_ids"]]
    flat = tok([r for g in groups for r in g.responses], add_special_tokens=False)["input_ids"]
    out, i = [], 0
    for g, p in zip(groups, p_len):
        longest = max(len(x) for x in flat[i : i + len(g.responses)])
        i += len(g.responses)
        if fixed + p + longest <= max_length:
            out.append(g)
    return out


def _tokenize_whole(tok, groups: list[PreferenceGroup], max_length: int, name: str) -> list[TokenizedGroup]:
    report = DataReport(name=name)
    out = tokenize_groups(groups, tok, report, max_length=max_length, min_prompt_tokens=0)
    if report.truncated or report.dropped or report.comparisons_dropped or len(out) != len(groups):
        raise RuntimeError(f"{name}: the pre-filter let a truncation or drop through: {report.to_dict()}")
    return out


def hh_groups(tok, data_dir: str | Path, n: int, max_length: int) -> list[TokenizedGroup]:
    """HH-RLHF harmless pairs (K = 2): the implicit prompt is the shared conversation prefix."""
    report = DataReport(name="hh")
    groups = records_to_groups(read_records(str(Path(data_dir) / HH_FILE)), "implicit_prompt", None, report, "skip")
    groups = _fits(tok, groups, max_length)[:n]
    return _tokenize_whole(tok, groups, max_length, "hh")


def alpaca_groups(tok, data_dir: str | Path, n: int, k: int, max_length: int, seed: int = 0) -> list[TokenizedGroup]:
    """AlpacaEval-2 prompts with K responses each and all C(K,2) comparisons.

    A response's score is ``preference - 1`` (P(it beats the reference)); the higher score wins.
    K responses with distinct scores are drawn among those that fit, so no comparison is a tie.
    """
    by_prompt: dict[str, dict[str, float]] = defaultdict(dict)
    with gzip.open(Path(data_dir) / ALPACA_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("preference") is None or not str(r.get("output_2") or "").strip():
                continue
            by_prompt[r["instruction"]][r["output_2"]] = float(r["preference"]) - 1.0
    rng = random.Random(seed)
    start, mid, end = special_tokens(tok)
    fixed = len(start) + len(mid) + len(end)
    out: list[PreferenceGroup] = []
    for prompt, scored in by_prompt.items():
        p = len(tok(prompt, add_special_tokens=False)["input_ids"])
        texts = list(scored)
        lens = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
        fit, seen = [], set()
        for t, n_tok in zip(texts, lens):
            if fixed + p + n_tok <= max_length and scored[t] not in seen:
                fit.append(t)
                seen.add(scored[t])
        if len(fit) < k:
            continue
        resp = rng.sample(fit, k)
        s = [scored[t] for t in resp]
        comps = [Comparison(i, j) if s[i] > s[j] else Comparison(j, i) for i, j in combinations(range(k), 2)]
        out.append(PreferenceGroup(prompt=prompt, responses=resp, comparisons=comps, scores=s, group_id=str(len(out))))
        if len(out) == n:
            break
    return _tokenize_whole(tok, out, max_length, "alpaca")


def simulator_groups(tok, n: int, k: int, max_length: int, seed: int = 0) -> list[TokenizedGroup]:
    """The built-in simulator, K responses and all C(K,2) comparisons; ties off (TRL has none)."""
    groups = generate(SimulatorConfig(num_prompts=n, k=k, tie_band=0.0, seed=seed))
    # Identical responses would be dropped by rmlab's tokenizer (and are no comparison at all).
    groups = [g for g in groups if len(set(g.responses)) == k and not any(c.tie for c in g.comparisons)]
    return _tokenize_whole(tok, _fits(tok, groups, max_length), max_length, "simulator")


def trl_pairs(groups: list[TokenizedGroup]) -> list[dict[str, list[int]]]:
    """One TRL row pair per comparison: the very token ids rmlab forwards for those two responses."""
    return [
        {"chosen_ids": g.prompt_ids + g.response_ids[w], "rejected_ids": g.prompt_ids + g.response_ids[lo]}
        for g in groups
        for w, lo in zip(g.winner, g.loser)
    ]


def unique_tokens(groups: list[TokenizedGroup]) -> int:
    """Real tokens of a workload counted once: each prompt once plus each response once."""
    return sum(len(g.prompt_ids) + sum(len(r) for r in g.response_ids) for g in groups)


def attention_pairs(groups: list[TokenizedGroup]) -> int:
    """(query, key) pairs causal attention needs with each prompt once: the prompt over itself, each
    response over the prompt and itself."""
    total = 0
    for g in groups:
        p = len(g.prompt_ids)
        total += p * (p + 1) // 2 + sum(len(r) * p + len(r) * (len(r) + 1) // 2 for r in g.response_ids)
    return total


def describe(groups: list[TokenizedGroup]) -> dict[str, float]:
    comps = sum(len(g.winner) for g in groups)
    return {
        "groups": len(groups),
        "comparisons": comps,
        "responses": sum(g.k for g in groups),
        "mean_prompt_tokens": sum(len(g.prompt_ids) for g in groups) / max(1, len(groups)),
        "mean_response_tokens": sum(len(r) for g in groups for r in g.response_ids) / max(1, sum(g.k for g in groups)),
        "unique_tokens_per_comparison": unique_tokens(groups) / max(1, comps),
        "attention_pairs_per_comparison": attention_pairs(groups) / max(1, comps),
    }
