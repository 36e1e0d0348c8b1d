"""RM-Bench, scored as THU-KEG/RM-Bench scores it (``compute_accuracy`` in ``scripts/utils.py``).

Rules (cited in docs/eval.md#benchmarks):
- a row has three chosen and three rejected responses in the order concise, detailed plain, detailed
  markdown; its domain is chat, code, math, safety-refuse or safety-response (``domain`` field, or the name of
  the per-domain file: ``chat_filtered.json``); domains are grouped by prefix into chat, math, code, safety;
- per domain, the 3x3 matrix M[i][j] = share of rows with r(chosen_i) > r(rejected_j) (a tie is wrong);
  hard = mean of the cells above the diagonal (the chosen answer is plainer than the rejected one), normal =
  mean of the diagonal (same style), easy = mean below it (the chosen answer is the fancier one);
- a domain's score is mean(hard, normal, easy); the overall score and each difficulty's overall number are the
  plain means over the four domains (the README's "Clarity on Avg Calculation").

rmlab adds the style-bias gap: ``normal - hard``, the accuracy lost when the rejected answer is the better
formatted one, and ``easy - hard``, the whole swing from style.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rmlab.benchmarks.common import BenchResult, Item, complete_score, mean, need, read_rows, text_list
from rmlab.data.sources import DataError

HUB = "THU-KEG/RM-Bench"
DOMAINS = ["chat", "math", "code", "safety"]
STYLES = ["concise", "detailed", "markdown"]


def domain_of(rec: dict, where: str) -> str:
    """The row's own domain (chat, code, math, safety-refuse, safety-response): its subset in the report."""
    d = rec.get("domain")
    if d is None:  # the repository's per-domain files carry no domain field: the file name says it
        d = Path(where.split(":")[0].split("[")[0]).name.split("_filtered")[0].split(".")[0]
    if isinstance(d, str) and group_of(d):
        return d
    raise DataError(where, f"no RM-Bench domain: field 'domain' is {rec.get('domain')!r} and the file name does not "
                    f"start with one of {', '.join(DOMAINS)}", "add domain: chat|code|math|safety-refuse|safety-response")


def group_of(domain: str) -> str:
    """The scored domain a row's domain belongs to, by prefix as the official code groups them ('' = none)."""
    return next((name for name in DOMAINS if domain.startswith(name)), "")


def load(bcfg: Any) -> tuple[list[Item], list[str]]:
    items = []
    for where, rec in read_rows(bcfg.source, bcfg.split, "RM-Bench"):
        chosen, rejected = text_list(rec, where, "chosen", 3), text_list(rec, where, "rejected", 3)
        items.append(Item(uid=str(rec.get("id", where)), subset=domain_of(rec, where),
                          prompt=need(rec, where, "prompt", str, "the prompt text"), responses=chosen + rejected,
                          n_chosen=3, where=where))
    if not items:
        raise DataError(bcfg.source, "no examples", "point benchmark.source at RM-Bench's data")
    return items, []


def matrix(rewards: list[list[float]]) -> list[list[float]]:
    """M[i][j]: share of rows whose chosen response in style i beats the rejected one in style j."""
    n = len(rewards)
    return [[sum(rs[i] > rs[3 + j] for rs in rewards) / n for j in range(3)] for i in range(3)]


def difficulty(m: list[list[float]]) -> dict[str, float]:
    return {
        "hard": mean([m[i][j] for i in range(3) for j in range(3) if j > i]),
        "normal": mean([m[i][i] for i in range(3)]),
        "easy": mean([m[i][j] for i in range(3) for j in range(3) if j < i]),
    }


def score(items: list[Item], rewards: list[list[float]]) -> BenchResult:
    per_domain: dict[str, list[int]] = {}
    for n, it in enumerate(items):
        per_domain.setdefault(group_of(it.subset), []).append(n)
    sections, subsets, scalars, mats = {}, {}, {"n_examples": float(len(items))}, {}
    for d in [d for d in DOMAINS if d in per_domain]:
        m = matrix([rewards[n] for n in per_domain[d]])
        lv = difficulty(m)
        mats[d] = m
        sections[d] = mean(lv.values())
        for k, v in lv.items():
            scalars[f"{d}/{k}"] = v
        scalars[f"{d}/style_gap"] = lv["normal"] - lv["hard"]
    total, missing = complete_score(sections, DOMAINS)
    for k in ("hard", "normal", "easy"):
        scalars[k] = mean([scalars[f"{d}/{k}"] for d in DOMAINS if d in sections]) if not missing else float("nan")
    scalars["style_gap"] = scalars["normal"] - scalars["hard"]  # accuracy lost to a fancier rejected answer
    scalars["style_swing"] = scalars["easy"] - scalars["hard"]
    notes = [f"no examples for domain(s) {', '.join(missing)}: the score is the mean of all four"] if missing else []
    per_item = []
    for it, rs in zip(items, rewards):
        cells = [rs[i] > rs[3 + j] for i in range(3) for j in range(3)]
        worst_c = min(range(3), key=lambda i: rs[i])
        best_r = max(range(3), key=lambda j: rs[3 + j])
        # mean of the 9 cells = mean(hard, normal, easy): 3 cells each, so a subset's mean credit is its score
        per_item.append({"uid": it.uid, "subset": it.subset, "section": group_of(it.subset), "credit": mean(cells),
                         "margin": rs[worst_c] - rs[3 + best_r], "chosen": worst_c, "rejected": 3 + best_r})
    for row in per_item:
        subsets.setdefault(row["subset"], []).append(row["credit"])
    subsets = {k: (mean(v), len(v)) for k, v in sorted(subsets.items())}
    tables = {"matrix": mats, "styles": STYLES}
    section_of = {k: group_of(k) for k in subsets}
    return BenchResult("rm_bench", total, sections, subsets, section_of, scalars, tables, per_item, notes)
