"""The eval report: metrics.json, PNG plots, report.md and a console summary table.

Plot functions return matplotlib figures (the wandb callback logs the same figures as images).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from rmlab.metrics import EvalResult, Predictions

# The headline rows of the console table and of report.md: (metric key, label, is a rate).
HEADLINE = [
    ("acc", "accuracy (strict, ties apart)", True),
    ("tie_rate", "labelled tie rate", True),
    ("pred_tie_rate", "predicted ties (r_w == r_l)", True),
    ("ece", "ECE of sigmoid(r_w - r_l)", False),
    ("brier", "Brier score", False),
    ("section/score", "section score (RewardBench-style)", True),
    ("length/pearson", "corr(reward, length)", False),
    ("length/acc_chosen_longer", "acc, chosen is longer", True),
    ("length/acc_chosen_shorter", "acc, chosen is shorter", True),
    ("rank/kendall_tau", "Kendall tau within groups", False),
    ("rank/spearman_rho", "Spearman rho within groups", False),
    ("truth/pearson", "corr(reward, true reward)", False),
    ("truth/acc", "acc against the true reward", True),
    ("truth/oracle_acc", "oracle acc (true reward on labels)", True),
]


def _fmt(v: float, rate: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if rate else f"{v:.4f}"


def summary_table(scalars: dict[str, float], title: str = "rmlab eval") -> str:
    rows = [(label, _fmt(scalars[k], rate)) for k, label, rate in HEADLINE if k in scalars]
    w = max(len(r[0]) for r in rows) if rows else 10
    lines = ["", title, "-" * (w + 12)]
    lines += [f"  {label:<{w}}  {val:>8}" for label, val in rows]
    lines.append(f"  {'comparisons (non-tie)':<{w}}  {int(scalars.get('n_comparisons', 0)):>8}")
    lines += [f"  {k:<{w}}  {_fmt(v, False):>8}" for k, v in head_metrics(scalars).items()]
    return "\n".join(lines)


def head_metrics(scalars: dict[str, float]) -> dict[str, float]:
    """The head's own metrics (judge position bias, attribute correlations): keys ``head/...``."""
    return {k: v for k, v in scalars.items() if k.startswith("head/")}


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5, 4), dpi=100)


def reliability_figure(bins: list[dict]):
    fig, ax = _figure()
    ok = [b for b in bins if b["count"]]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    ax.bar(
        [b["lo"] for b in ok],
        [b["accuracy"] for b in ok],
        width=width,
        align="edge",
        alpha=0.6,
        edgecolor="k",
        label="observed",
    )
    ax.plot([b["confidence"] for b in ok], [b["accuracy"] for b in ok], "o", color="C1", label="bin mean p")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(
        xlabel="p = sigmoid(r_a - r_b)",
        ylabel="share where a is preferred",
        title="Reliability diagram",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def histogram_figure(chosen: np.ndarray, rejected: np.ndarray):
    fig, ax = _figure()
    both = np.concatenate([chosen, rejected]) if chosen.size + rejected.size else np.zeros(1)
    edges = np.histogram_bin_edges(both, bins=30)
    ax.hist(chosen, bins=edges, alpha=0.55, label=f"chosen (mean {chosen.mean():.3f})" if chosen.size else "chosen")
    ax.hist(
        rejected,
        bins=edges,
        alpha=0.55,
        label=f"rejected (mean {rejected.mean():.3f})" if rejected.size else "rejected",
    )
    ax.set(xlabel="reward", ylabel="count", title="Rewards of chosen and rejected")
    # below the axes: inside, wherever it went, it covered the bars of one tail
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def length_figure(reward: np.ndarray, length: np.ndarray, corr: float):
    fig, ax = _figure()
    ax.scatter(length, reward, s=6, alpha=0.4)
    if length.size > 1 and np.ptp(length) > 0:
        a, b = np.polyfit(length.astype(float), reward, 1)
        xs = np.array([length.min(), length.max()], float)
        ax.plot(xs, a * xs + b, color="C3", label=f"fit, pearson r = {corr:.3f}")
        ax.legend()
    ax.set(xlabel="response length (tokens)", ylabel="reward", title="Length bias")
    fig.tight_layout()
    return fig


def bucket_figure(buckets: dict[str, Any]):
    fig, ax = _figure()
    acc = buckets.get("acc", {})
    names = list(acc)
    ax.bar(range(len(names)), [acc[k][0] for k in names], color="C2", alpha=0.8)
    ax.set_xticks(range(len(names)), names)  # positions, not category strings: labels like "3" stay labels
    for i, k in enumerate(names):
        ax.text(i, acc[k][0] + 0.01, f"n={acc[k][1]}", ha="center", fontsize=8)
    ax.axhline(0.5, ls="--", color="gray")
    kind = buckets.get("kind", "bucket")
    ax.set(xlabel=f"{kind} bucket", ylabel="accuracy", title=f"Accuracy by {kind}", ylim=(0, 1.05))
    fig.tight_layout()
    return fig


def subset_figure(by_subset: dict[str, tuple[float, int]]):
    fig, ax = _figure()
    names = list(by_subset)
    # one row of 0.2 inch per subset (PandaLM has 52), so the labels never overlap; a long name is cut behind an ellipsis
    fig.set_size_inches(6, max(4.0, 1.2 + 0.2 * len(names)))
    ax.barh(range(len(names)), [by_subset[k][0] for k in names], color="C4", alpha=0.8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_yticks(range(len(names)), [k if len(k) <= 32 else k[:31] + "…" for k in names], fontsize=8)
    ax.axvline(0.5, ls="--", color="gray")
    ax.set(xlabel="accuracy", title="Accuracy by subset", xlim=(0, 1))
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path.name


def worst_comparisons(pred: Predictions, tokenizer: Any, k: int = 10, chars: int = 300) -> list[dict[str, Any]]:
    """The k non-tie comparisons the model gets most wrong (lowest r_w - r_l), with decoded text."""
    nt = np.flatnonzero(~pred.tie)
    if nt.size == 0 or pred.tokens is None:
        return []
    gap = pred.rw[nt] - pred.rl[nt]
    rows = []
    for ci in nt[np.argsort(gap, kind="stable")[:k]]:
        w, lo = int(pred.winner[ci]), int(pred.loser[ci])

        def text(ids: list[int]) -> str:
            s = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else str(ids)
            return s if len(s) <= chars else "..." + s[-chars:]  # the end is where the reward is read

        rows.append(
            {
                "group_id": pred.group_ids[int(pred.group[w])],
                "prompt": text(pred.tokens[w][0]),
                "chosen": text(pred.tokens[w][1]),
                "rejected": text(pred.tokens[lo][1]),
                "reward_chosen": float(pred.reward[w]),
                "reward_rejected": float(pred.reward[lo]),
                # A writing model's (CLoud, reasoning judges) generated critiques, which the rewards were read after.
                **({"critique_chosen": pred.texts[w], "critique_rejected": pred.texts[lo]} if pred.texts else {}),
            }
        )
    return rows


def json_safe(x: Any) -> Any:
    """NaN/inf -> null, so metrics.json is strict JSON (jq, JavaScript and wandb read it)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return json_safe(x.item())
    return x


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_report(
    out: Path, result: EvalResult, pred: Predictions, info: dict[str, Any], tokenizer: Any = None, worst_k: int = 10
) -> str:
    """Write metrics.json, the PNGs and report.md into ``out``; return the console summary."""
    out = Path(out)
    s, t = result.scalars, result.tables
    nt = ~pred.tie
    plots = {
        "reliability": save(reliability_figure(t["reliability"]), out / "reliability.png"),
        "reward_hist": save(histogram_figure(pred.rw[nt], pred.rl[nt]), out / "reward_hist.png"),
        "length_bias": save(
            length_figure(pred.reward, pred.response_len, s.get("length/pearson", float("nan"))),
            out / "length_bias.png",
        ),
    }
    if "buckets" in t:
        plots["acc_by_bucket"] = save(bucket_figure(t["buckets"]), out / "acc_by_bucket.png")
    if "subset" in t:
        plots["acc_by_subset"] = save(subset_figure(t["subset"]), out / "acc_by_subset.png")
    worst = worst_comparisons(pred, tokenizer, worst_k)
    (out / "metrics.json").write_text(
        json.dumps(
            json_safe({"metrics": s, "tables": t, "info": info, "plots": plots, "worst": worst}), indent=2, default=str
        )
    )

    md = [f"# rmlab eval: {info.get('data', '')}", ""]
    md += [
        f"- model: `{info.get('model')}`",
        f"- split: {info.get('split')}, {info.get('groups')} groups, "
        f"{info.get('responses')} responses, {int(s.get('n_comparisons', 0))} non-tie comparisons, {int(s.get('n_ties', 0))} ties",
        *([f"- **warning**: {info['split_warning']}"] if info.get("split_warning") else []),
        "",
    ]
    md += ["## Headline", "", "| metric | value |", "|---|---|"]
    md += [f"| {label} | {_fmt(s[k], rate)} |" for k, label, rate in HEADLINE if k in s]
    if head_metrics(s):
        md += ["", "## Head", "", "Judge: order-averaged accuracy and position bias; attribute head: correlation of each"]
        md += ["output with its rating (docs/heads.md).", "", "| metric | value |", "|---|---|"]
        md += [f"| {k} | {_fmt(v, False)} |" for k, v in head_metrics(s).items()]
    if "subset" in t:
        md += ["", "## Accuracy by subset", "", "| subset | accuracy | n |", "|---|---|---|"]
        md += [f"| {_md_cell(k or '(none)')} | {_fmt(a, True)} | {n} |" for k, (a, n) in t["subset"].items()]
        md += ["", "Sections (subset accuracies weighted by example count; score = mean of sections):", ""]
        md += [f"- {k}: {_fmt(v, True)}" for k, v in t["sections"].items()]
    if "buckets" in t:
        b = t["buckets"]
        md += ["", f"## Accuracy by {b['kind']} bucket", ""]
        if b.get("edges"):
            md += [f"Quartile edges of |{b['kind']}|: " + ", ".join(f"{e:.3g}" for e in b["edges"]), ""]
        md += ["| bucket | accuracy | n |", "|---|---|---|"] + [
            f"| {k} | {_fmt(a, True)} | {n} |" for k, (a, n) in b["acc"].items()
        ]
    md += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    if worst:
        md += [
            "",
            f"## The {len(worst)} worst-scored comparisons",
            "",
            "| prompt | chosen | rejected | r chosen | r rejected |",
            "|---|---|---|---|---|",
        ]
        md += [
            f"| {_md_cell(w['prompt'][-120:])} | {_md_cell(w['chosen'][-160:])} | {_md_cell(w['rejected'][-160:])} | "
            f"{w['reward_chosen']:.3f} | {w['reward_rejected']:.3f} |"
            for w in worst
        ]
        if "critique_chosen" in worst[0]:  # the generated critiques the rewards were read after
            md += ["", "Their generated critiques:", "", "| critique of chosen | critique of rejected |", "|---|---|"]
            md += [f"| {_md_cell(w['critique_chosen'][:200])} | {_md_cell(w['critique_rejected'][:200])} |" for w in worst]
    md += ["", "All metrics: `metrics.json`. Glossary: docs/eval.md.", ""]
    (out / "report.md").write_text("\n".join(md))
    return (
        summary_table(s, f"rmlab eval: {info.get('data', '')} ({info.get('split')})")
        + f"\n  report: {out / 'report.md'}"
    )
