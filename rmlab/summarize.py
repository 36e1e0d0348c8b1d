"""Summarize a Hydra multirun: which overrides vary, against the final metrics; mean ± std over seeds.

    python -m rmlab.summarize outputs/train/multiruns/<date>        # writes summary.md, summary.csv, summary.png there

Each run dir holds ``metrics.json`` (train or eval) and ``.hydra/overrides.yaml``. Overrides that
take one value in every run are left out of the table; ``seed`` is the replicate axis: runs that
differ only by seed are one configuration, reported as mean ± std (sample std, n - 1).

Benchmark evals (``eval.py -m benchmark=rewardbench model.name_or_path=a,b``) become one leaderboard: a row per
model, best score first, the benchmark's sections beside the score, and a grouped bar chart.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from rmlab.summary import python_command

DEFAULT_METRICS = ("val/acc", "val/loss", "val/ece", "val/brier", "val/truth/acc", "acc", "ece")


def load_run(run_dir: Path) -> dict[str, Any] | None:
    import yaml  # read only when runs are summarized

    m, o = run_dir / "metrics.json", run_dir / ".hydra" / "overrides.yaml"
    if not m.exists():
        return None
    blob = json.loads(m.read_text())
    metrics = {k: v for k, v in (blob.get("metrics") or {}).items() if isinstance(v, (int, float))}
    overrides = {}
    for item in (yaml.safe_load(o.read_text()) if o.exists() else None) or []:
        k, _, v = str(item).partition("=")
        overrides[k.lstrip("+~")] = v
    info = blob.get("info") if isinstance(blob.get("info"), dict) else {}
    sections = list((blob.get("tables") or {}).get("sections") or {})
    return {"dir": run_dir.name, "overrides": overrides, "metrics": metrics, "info": info, "sections": sections}


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every run dir under ``sweep_dir``: a dir with a ``metrics.json`` that is not inside another run dir (a run's
    own outputs, such as ``python -m rmlab.bon``'s ``<run>/bon/metrics.json``, are not runs of the sweep)."""
    dirs: list[Path] = []
    for p in sorted(Path(sweep_dir).rglob("metrics.json"), key=lambda p: (len(p.parts), str(p))):
        if not any(d in p.parents for d in dirs):
            dirs.append(p.parent)
    runs = []
    for d in sorted(dirs):
        r = load_run(d)
        if r is not None:
            if d != Path(sweep_dir):  # named from the sweep dir down: a sweep of nested job dirs names each fully
                r["dir"] = d.relative_to(sweep_dir).as_posix()
            runs.append(r)
    return runs


def varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["overrides"]})
    return [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], metrics: list[str] | None = None, seed_key: str = "seed") -> dict[str, Any]:
    """{'keys': varying override keys, 'metrics': names, 'runs': rows, 'groups': mean ± std rows}."""
    if not runs:
        raise ValueError("no run dirs with metrics.json found")
    keys = varying_keys(runs)
    avail = {k for r in runs for k in r["metrics"]}
    metrics = [m for m in (metrics or DEFAULT_METRICS) if m in avail]
    if not metrics:
        raise ValueError(f"none of the metrics asked for are in the runs; they have: {sorted(avail)[:30]}")
    cfg_keys = [k for k in keys if k != seed_key]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r["overrides"].get(k, "") for k in cfg_keys), []).append(r)
    grows = []
    for cfg, members in groups.items():
        row = {"config": dict(zip(cfg_keys, cfg)), "n": len(members)}
        for m in metrics:
            row[m] = mean_std([float(r["metrics"].get(m, math.nan)) for r in members])
        grows.append(row)
    return {"keys": keys, "config_keys": cfg_keys, "metrics": metrics, "runs": runs, "groups": grows}


def _f(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"


def to_markdown(s: dict[str, Any]) -> str:
    keys, ms = s["keys"], s["metrics"]
    lines = ["## Runs", "", "| run | " + " | ".join(keys + ms) + " |", "|" + "---|" * (1 + len(keys) + len(ms))]
    for r in s["runs"]:
        cells = [r["overrides"].get(k, "") for k in keys] + [_f(float(r["metrics"].get(m, math.nan))) for m in ms]
        lines.append(f"| {r['dir']} | " + " | ".join(cells) + " |")
    ck = s["config_keys"]
    lines += [
        "",
        "## Mean ± std over seeds",
        "",
        "| " + " | ".join(ck + ["n"] + ms) + " |",
        "|" + "---|" * (len(ck) + 1 + len(ms)),
    ]
    for g in s["groups"]:
        cells = [g["config"][k] for k in ck] + [str(g["n"])] + [f"{_f(g[m][0])} ± {_f(g[m][1])}" for m in ms]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(s: dict[str, Any], path: Path, metric: str | None = None) -> Path:
    """Mean ± std of ``metric`` (default: the first) per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or s["metrics"][0]
    labels = [", ".join(f"{k}={v}" for k, v in g["config"].items()) or "all" for g in s["groups"]]
    means = [g[metric][0] for g in s["groups"]]
    stds = [g[metric][1] for g in s["groups"]]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels) + 2), 4), dpi=100)
    ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color="C0", alpha=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set(ylabel=metric, title=f"{metric}: mean ± std over seeds (n = {', '.join(str(g['n']) for g in s['groups'])})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- benchmark leaderboards
def benchmark_of(runs: list[dict[str, Any]]) -> str | None:
    """The benchmark every run scored (eval.py benchmark=...), or None (a training sweep, mixed runs)."""
    names = {(r.get("info") or {}).get("benchmark") for r in runs}
    return names.pop() if len(names) == 1 and None not in names else None


def leaderboard(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per run, best ``score`` first: the varying overrides name it (else its model), then the score
    and the sections of the benchmark, in the benchmark's order."""
    keys = varying_keys(runs)
    sections: list[str] = []
    for r in runs:
        sections += [x for x in r.get("sections", []) if x not in sections]
    cols = ["score"] + [f"section/{x}" for x in sections]
    rows = []
    for r in runs:
        name = ", ".join(f"{k}={r['overrides'][k]}" for k in keys if k in r["overrides"]) or str(
            (r.get("info") or {}).get("model", r["dir"]))
        rows.append({"name": name, "dir": r["dir"], **{c: float(r["metrics"].get(c, math.nan)) for c in cols}})
    rows.sort(key=lambda x: -x["score"] if not math.isnan(x["score"]) else math.inf)
    return {"benchmark": benchmark_of(runs), "columns": cols, "rows": rows}


def leaderboard_markdown(lb: dict[str, Any]) -> str:
    cols = lb["columns"]
    head = ["rank", "model", *[c.removeprefix("section/") for c in cols]]
    lines = [f"## Leaderboard: {lb['benchmark']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(lb["rows"], 1):
        cells = ["n/a" if math.isnan(r[c]) else f"{100 * r[c]:.1f}" for c in cols]
        lines.append(f"| {i} | {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend_label(rank: int, name: str, width: int = 60) -> str:
    """"<rank>. <name>", a long name cut at its start (a path's end tells models apart) behind an ellipsis."""
    return f"{rank}. " + (name if len(name) <= width else "\u2026" + name[-(width - 1):])


def leaderboard_chart(lb: dict[str, Any], path: Path) -> Path:
    """Grouped bars: for each model its score and its sections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, rows = lb["columns"], lb["rows"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(cols) + 2), 4 + 0.22 * len(rows)), dpi=100)
    for i, r in enumerate(rows):  # percent, as the table; each model by its rank and the name the table gives it
        ax.bar([j + i * width for j in range(len(cols))], [100 * r[c] for c in cols], width,
               label=legend_label(i + 1, r["name"]))
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(cols))],
                  [c.removeprefix("section/") for c in cols], rotation=20, ha="right")
    ax.set(ylim=(0, 100), ylabel="score (%)", title=f"{lb['benchmark']}: leaderboard")
    # below the axes: inside, it covered the bars of the best models (those reaching 100)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def write_leaderboard(runs: list[dict[str, Any]], out: Path) -> str:
    lb = leaderboard(runs)
    md = leaderboard_markdown(lb)
    (out / "summary.md").write_text(md + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "model", "run", *lb["columns"]])
        for i, r in enumerate(lb["rows"], 1):
            w.writerow([i, r["name"], r["dir"], *[r[c] for c in lb["columns"]]])
    leaderboard_chart(lb, out / "summary.png")
    return md


def sweep_hint(sweep_dir: str | Path) -> str:
    """The lines a finished ``-m`` sweep ends with: how many runs finished, and the command that compares them."""
    sweep = Path(sweep_dir).resolve()
    done = len(collect(sweep)) if sweep.is_dir() else 0
    return (f"\nrmlab sweep finished: {done} run(s) in {sweep}\n"
            f"  next: {python_command()} -m rmlab.summarize {shlex.quote(str(sweep))}")


class SweepHint(Callback):
    """Hydra callback (conf/train.yaml ``hydra.callbacks``): after a ``-m`` sweep, print :func:`sweep_hint`. Without it
    a sweep ended on its last job's summary, whose ``next:`` lines are about that one run."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        print(sweep_hint(config.hydra.sweep.dir), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rmlab.summarize", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a Hydra multirun dir (holds one sub-dir per run)")
    ap.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names (those present are shown)"
    )
    ap.add_argument("--plot-metric", default=None, help="metric of the bar chart (default: the first shown)")
    ap.add_argument("--seed-key", default="seed", help="the override that marks replicates")
    ap.add_argument("--out", default=None, help="where summary.{md,csv,png} go (default: the sweep dir)")
    a = ap.parse_args(argv)
    runs = collect(a.sweep_dir)
    out = Path(a.out or a.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    if runs and benchmark_of(runs):  # eval.py -m benchmark=...: one leaderboard of the models
        print(write_leaderboard(runs, out))
        print(f"\nwrote {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'summary.png'}")
        return
    s = summarize(runs, a.metrics.split(","), a.seed_key)
    md = to_markdown(s)
    (out / "summary.md").write_text(md + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *s["keys"], *s["metrics"]])
        for r in s["runs"]:
            w.writerow(
                [
                    r["dir"],
                    *[r["overrides"].get(k, "") for k in s["keys"]],
                    *[r["metrics"].get(m, "") for m in s["metrics"]],
                ]
            )
    png = bar_chart(s, out / "summary.png", a.plot_metric)
    print(md)
    print(f"\nwrote {out / 'summary.md'}, {out / 'summary.csv'}, {png}")


if __name__ == "__main__":
    main()
