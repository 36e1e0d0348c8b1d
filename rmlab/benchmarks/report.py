"""A benchmark's report: metrics.json, scores.jsonl, report.md and PNGs.

The headline score sits beside each section and subset; the worst-scored examples of each section are shown
with their text; the length analysis is rmlab's own (``rmlab.metrics``) over every chosen-vs-rejected pair.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from rmlab.benchmarks.common import BenchResult, Item
from rmlab.metrics import Predictions, compute_all
from rmlab.report import _md_cell, json_safe, length_figure, save

TITLES = {"rewardbench": "RewardBench", "rewardbench2": "RewardBench 2", "rm_bench": "RM-Bench",
          "best_of_k": "Best-of-K"}
PAIRWISE_KEYS = ("acc", "ece", "brier", "length/pearson", "length/spearman", "length/chosen_longer_rate",
                 "length/acc_chosen_longer", "length/acc_chosen_shorter", "length/acc_same_length")


def pairs_of(item: Item) -> list[tuple[int, int]]:
    """(winner, loser) response pairs the benchmark implies: every chosen x rejected, or gold-ordered pairs."""
    if item.gold is not None:
        g = item.gold
        return [(i, j) for i in range(len(g)) for j in range(len(g)) if g[i] > g[j]]
    n = item.n_chosen
    return [(i, j) for i in range(n) for j in range(n, len(item.responses))]


def predictions(items: list[Item], rewards: list[list[float]], tokenizer: Any) -> Predictions:
    """rmlab's ``Predictions`` of a benchmark: every response, and its implied pairs as comparisons."""
    flat = [r for it in items for r in it.responses]
    if tokenizer is not None and flat:
        lens = [len(x) for x in tokenizer(flat, add_special_tokens=False)["input_ids"]]
    else:
        lens = [len(x) for x in flat]
    reward, group, winner, loser, subset = [], [], [], [], []
    off = 0
    for gi, (it, rs) in enumerate(zip(items, rewards)):
        reward += rs
        group += [gi] * len(rs)
        for w, lo in pairs_of(it):
            winner.append(off + w)
            loser.append(off + lo)
            subset.append(it.subset)
        off += len(rs)
    n, c = len(reward), len(winner)
    return Predictions(
        reward=np.asarray(reward, float), group=np.asarray(group, np.int64), response_len=np.asarray(lens, np.int64),
        true_reward=np.full(n, np.nan), rank=np.full(n, np.nan), winner=np.asarray(winner, np.int64),
        loser=np.asarray(loser, np.int64), tie=np.zeros(c, bool), margin=np.full(c, np.nan),
        strength=np.full(c, -1, np.int64), subset=np.asarray(subset, dtype=object),
        group_ids=[it.uid for it in items],
    )


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _clip(s: str, n: int = 240) -> str:
    return s if len(s) <= n else s[:n] + "..."


def worst_examples(result: BenchResult, items: list[Item], rewards: list[list[float]], k: int) -> dict[str, list]:
    """Per section, the ``k`` items with the lowest margin (worst chosen - best rejected), with their text."""
    by_section: dict[str, list[int]] = {}
    for n, row in enumerate(result.per_item):
        by_section.setdefault(row["section"] or row["subset"], []).append(n)
    out = {}
    for sec, idx in by_section.items():
        rows = []
        for n in sorted(idx, key=lambda n: result.per_item[n]["margin"])[:k]:
            it, rs, row = items[n], rewards[n], result.per_item[n]
            prompt = it.prompt if isinstance(it.prompt, str) else "\n".join(m["content"] for m in it.prompt)
            rows.append({"uid": it.uid, "subset": it.subset, "prompt": prompt, "chosen": it.responses[row["chosen"]],
                         "rejected": it.responses[row["rejected"]], "reward_chosen": rs[row["chosen"]],
                         "reward_rejected": rs[row["rejected"]], "credit": row["credit"]})
        out[sec] = rows
    return out


def members(result: BenchResult, sec: str) -> list[str]:
    """The scored subsets of a section, in the benchmark's own order."""
    return [s for s, owner in result.section_of.items() if owner == sec and s in result.subsets]


def sections_figure(result: BenchResult):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for sec, v in result.sections.items():
        rows.append((sec, v, True))
        rows += [(f"  {s}", result.subsets[s][0], False) for s in members(result, sec) if s != sec]
    rows += [(f"  {s}", a, False) for s, (a, _) in result.subsets.items() if not result.section_of.get(s)]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(rows) + 1.2)), dpi=100)
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r[1] for r in rows], color=["C0" if r[2] else "C7" for r in rows], alpha=0.85)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    if not math.isnan(result.score):
        ax.axvline(result.score, color="C3", ls="--", label=f"score {100 * result.score:.1f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set(xlim=(0, 1), xlabel="score", title=f"{TITLES.get(result.name, result.name)}: sections (blue) and subsets")
    fig.tight_layout()
    return fig


def matrix_figure(mats: dict[str, list[list[float]]], styles: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.2), dpi=100, squeeze=False)
    for ax, (d, m) in zip(axes[0], mats.items()):
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i in range(3):
            for j in range(3):
                ax.text(j, i, f"{100 * m[i][j]:.0f}", ha="center", va="center", color="w" if m[i][j] < 0.6 else "k")
        ax.set_xticks(range(3), styles, fontsize=7)
        ax.set_yticks(range(3), styles, fontsize=7)
        ax.set(xlabel="rejected style", ylabel="chosen style", title=d)
    fig.suptitle("RM-Bench: accuracy, chosen style x rejected style (above diagonal = hard)", fontsize=9)
    fig.tight_layout()
    return fig


def curve_figure(cur: dict[int, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(cur)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(ks, [cur[k]["gold_best"] for k in ks], "o--", color="gray", label="best available")
    ax.plot(ks, [cur[k]["gold_picked"] for k in ks], "o-", color="C0", label="picked by the reward model")
    ax.plot(ks, [cur[k]["gold_mean"] for k in ks], "o:", color="C3", label="random pick")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="K (responses per prompt)", ylabel="gold score", title="Best-of-K: gold score of the pick")
    ax.legend()
    fig.tight_layout()
    return fig


def write(out: Path, result: BenchResult, items: list[Item], rewards: list[list[float]], info: dict[str, Any],
          tokenizer: Any = None, worst_k: int = 5) -> str:
    """Write metrics.json, scores.jsonl, report.md and the PNGs into ``out``; return the console summary."""
    out = Path(out)
    pred = predictions(items, rewards, tokenizer)
    pair = compute_all(pred).scalars if pred.winner.size else {}
    metrics = result.flat()
    metrics.update({f"pairwise/{k}": pair[k] for k in PAIRWISE_KEYS if k in pair})
    plots = {"sections": save(sections_figure(result), out / "bench_sections.png"),
             "length_bias": save(length_figure(pred.reward, pred.response_len, pair.get("length/pearson", math.nan)),
                                 out / "length_bias.png")}
    if "matrix" in result.tables:
        plots["style_matrix"] = save(matrix_figure(result.tables["matrix"], result.tables["styles"]),
                                     out / "style_matrix.png")
    if result.tables.get("curve"):
        plots["best_of_k"] = save(curve_figure(result.tables["curve"]), out / "best_of_k.png")
    worst = worst_examples(result, items, rewards, worst_k)
    with open(out / "scores.jsonl", "w", encoding="utf-8") as f:
        for it, rs, row in zip(items, rewards, result.per_item):
            f.write(json.dumps({"id": it.uid, "subset": it.subset, "n_chosen": it.n_chosen, "rewards": rs,
                                **({"gold": it.gold} if it.gold is not None else {}), "credit": row["credit"]}) + "\n")
    tables = {"sections": result.sections, "subsets": result.subsets, "section_of": result.section_of,
              **result.tables}
    (out / "metrics.json").write_text(json.dumps(json_safe(
        {"metrics": metrics, "tables": tables, "info": info, "plots": plots, "worst": worst, "notes": result.notes}),
        indent=2, default=str))

    title = TITLES.get(result.name, result.name)
    md = [f"# rmlab benchmark: {title}", "", f"- model: `{info.get('model')}`", f"- data: `{info.get('source')}`, "
          f"{info.get('examples')} examples, {info.get('responses')} responses scored, {info.get('seconds')} s", ""]
    if result.notes:
        md += ["**Notes**", ""] + [f"- {n}" for n in result.notes] + [""]
    md += ["## Headline", "", f"**{title} score: {_pct(result.score)}**", ""]
    if math.isnan(result.score):
        md += ["(n/a: see the notes; the leaderboard's score needs every section)", ""]
    md += ["| section | score | | subset | score | n |", "|---|---|---|---|---|---|"]
    for sec, v in result.sections.items():
        for n, s in enumerate(members(result, sec) or [sec]):
            a, c = result.subsets.get(s, (math.nan, 0))
            md.append(f"| {sec if n == 0 else ''} | {_pct(v) if n == 0 else ''} | | {s} | {_pct(a)} | {c} |")
    loose = [s for s in result.subsets if not result.section_of.get(s)]
    for s in loose:
        a, c = result.subsets[s]
        md.append(f"| (no section) | | | {s} | {_pct(a)} | {c} |")
    md += _specific(result)
    md += ["", "## Length and pairwise view", "",
           "Every chosen-vs-rejected pair the benchmark implies, through rmlab's metrics (docs/eval.md glossary):", "",
           "| metric | value |", "|---|---|"]
    md += [f"| {k} | {_pct(pair[k]) if k.startswith(('acc', 'length/acc', 'length/chosen')) else _num(pair[k])} |"
           for k in PAIRWISE_KEYS if k in pair]
    md += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    md += ["", "## The worst-scored examples of each section (lowest worst-chosen minus best-rejected reward)", ""]
    for sec, rows in worst.items():
        md += [f"### {sec}", "", "| id | subset | prompt | chosen | rejected | r chosen | r rejected |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {_md_cell(str(w['uid']))} | {_md_cell(w['subset'])} | {_md_cell(_clip(w['prompt'], 160))} | "
               f"{_md_cell(_clip(w['chosen']))} | {_md_cell(_clip(w['rejected']))} | {w['reward_chosen']:.3f} | "
               f"{w['reward_rejected']:.3f} |" for w in rows]
        md.append("")
    md += ["Per-example rewards: `scores.jsonl`; all numbers: `metrics.json`. Rules and sources: docs/eval.md#benchmarks.", ""]
    (out / "report.md").write_text("\n".join(md))

    w = max([len(s) for s in result.sections] + [12])
    lines = ["", f"rmlab benchmark: {title}", "-" * (w + 14), f"  {'score':<{w}}  {_pct(result.score):>8}"]
    lines += [f"  {s:<{w}}  {_pct(v):>8}" for s, v in result.sections.items()]
    lines += [f"  note: {n}" for n in result.notes]
    lines.append(f"  report: {out / 'report.md'}")
    return "\n".join(lines)


def _specific(result: BenchResult) -> list[str]:
    s = result.scalars
    if result.name == "rm_bench":
        md = ["", "## Difficulty by domain (RM-Bench)", "",
              "hard: the chosen answer is plainer than the rejected one; easy: fancier; style gap = normal - hard", "",
              "| domain | hard | normal | easy | score | style gap |", "|---|---|---|---|---|---|"]
        for d in result.sections:
            md.append(f"| {d} | {_pct(s[f'{d}/hard'])} | {_pct(s[f'{d}/normal'])} | {_pct(s[f'{d}/easy'])} | "
                      f"{_pct(result.sections[d])} | {_pct(s[f'{d}/style_gap'])} |")
        md.append(f"| **all** | {_pct(s['hard'])} | {_pct(s['normal'])} | {_pct(s['easy'])} | {_pct(result.score)} | "
                  f"{_pct(s['style_gap'])} |")
        md += ["", f"Style-bias gap: accuracy moves by {_pct(s['style_gap'])} points from same-style pairs to pairs where "
               f"the rejected answer is the better formatted one (easy - hard: {_pct(s['style_swing'])})."]
        return md
    if result.name == "rewardbench2" and "ties/acc_ref" in s:
        return ["", "## Ties (RewardBench 2's own rule)", "", "| part | weight | value |", "|---|---|---|",
                f"| accuracy, tied prompts | 0.30 | {_pct(s['ties/acc_tied'])} |",
                f"| accuracy, reference prompts | 0.30 | {_pct(s['ties/acc_ref'])} |",
                f"| correct-incorrect gap > spread of correct | 0.20 | {_pct(s['ties/preferred'])} |",
                f"| same, with the smaller of the two gaps | 0.20 | {_pct(s['ties/preferred_hard'])} |",
                f"| tanh(gap / spread - 1) | 0.01 | {_num(s['ties/margin'])} |"]
    if result.name == "best_of_k":
        md = ["", "## Gold score of the pick", "", "| metric | value |", "|---|---|"]
        md += [f"| {k} | {_num(s[k])} |" for k in ("gold_picked", "gold_best", "gold_mean", "regret", "gap_closed",
                                                    "mean_k") if k in s]
        md += [f"| {k} | {int(v)} |" for k, v in s.items() if k.startswith("dropped/")]
        cur = result.tables.get("curve") or {}
        if cur:
            md += ["", "| K | acc | gold of pick | best available | random pick | draws |", "|---|---|---|---|---|---|"]
            md += [f"| {k} | {_pct(c['acc'])} | {_num(c['gold_picked'])} | {_num(c['gold_best'])} | "
                   f"{_num(c['gold_mean'])} | {c['n']} |" for k, c in sorted(cur.items())]
        return md
    return []
