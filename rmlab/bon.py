"""Best-of-n against the simulator's true reward: how much a reward model is worth before it is exploited.

    python -m rmlab.bon --model outputs/train/runs/<run>/export
    python -m rmlab.bon --model a/export --model b/export --model c/export --combine mean,min,uwo
    python -m rmlab.bon --summarize outputs/bon/bt outputs/bon/margin --out docs/results/overopt

For each of ``--prompts`` held-out simulator prompts (prompts whose text the training run held out for
validation), the simulator's generator draws one pool of ``--pool`` (256) responses. Best-of-n picks, of n
responses, the one the reward model scores highest; its *true* reward (the simulator's, which the labels only
approximated) and its *proxy* reward (the model's score) are recorded against KL_bon = log n - (n - 1)/n, the
KL divergence of best-of-n from the generator (Gao, Schulman and Hilton 2023, "Scaling laws for reward model
overoptimization"; their figure 1 is this plot).

No resampling: the expectation over all n-subsets of the pool is exact. Sort the pool by the model's score
once; the response at ascending position i (0-based) is the best of a uniformly random n-subset with
probability C(i, n-1) / C(N, n), so E[value of the pick] = sum_i C(i, n-1) / C(N, n) * value_i. A random
n-subset of N i.i.d. samples is n i.i.d. samples, so this is an unbiased estimate of best-of-n for every
n <= N. Responses with equal scores share their mean value (a tie is broken uniformly at random).

With several models, each is scored once; the curves are each model's own and each requested combination
(``--combine``: rmlab.models.ensemble's mean, min, uwo over the members' normalized rewards). Writes
``metrics.json`` (curves, and per curve the peak true reward, the n at the peak and the drop from the peak to
n = N), ``curves.csv`` and ``bon.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from rmlab.data.simulator import SimulatorConfig, draw_prompt, draw_response

VALUES = ("true", "proxy", "annotator", "flattery")  # what is recorded of the picked response


def kl_bon(n: int | np.ndarray) -> np.ndarray:
    """KL(best-of-n || generator) = log n - (n - 1)/n (Stiennon et al. 2020; Gao et al. 2023)."""
    n = np.asarray(n, dtype=float)
    return np.log(n) - (n - 1) / n


def n_grid(pool: int) -> list[int]:
    """1 .. pool on a log grid (steps of sqrt 2), ending at pool."""
    ns = {1, pool}
    x = 1.0
    while x < pool:
        ns.add(int(round(x)))
        x *= math.sqrt(2)
    return sorted(n for n in ns if 1 <= n <= pool)


def bon_weights(pool: int, n: int) -> np.ndarray:
    """P(the response at ascending position i is the best of a random n-subset) = C(i, n-1) / C(pool, n)."""
    if not 1 <= n <= pool:
        raise ValueError(f"n must be in [1, {pool}], got {n}")
    i = np.arange(pool, dtype=float)
    w = np.zeros(pool)
    ok = i >= n - 1
    lg = math.lgamma
    log_den = lg(pool + 1) - lg(n + 1) - lg(pool - n + 1)
    w[ok] = np.exp(np.array([lg(k + 1) - lg(n) - lg(k - n + 2) for k in i[ok]]) - log_den)
    return w


def bon_expectation(scores: np.ndarray, values: np.ndarray, ns: list[int]) -> np.ndarray:
    """Expected values [len(ns), V] of the best-of-n pick by ``scores`` [N] over every n-subset of the pool;
    ``values`` [N, V]. Equal scores share their mean values (uniform tie-breaking)."""
    scores = np.asarray(scores, dtype=float)
    values = np.asarray(values, dtype=float).reshape(len(scores), -1)
    order = np.argsort(scores, kind="stable")
    s, v = scores[order], values[order].copy()
    start = 0
    for end in range(1, len(s) + 1):  # average each block of equal scores
        if end == len(s) or s[end] != s[start]:
            if end - start > 1:
                v[start:end] = v[start:end].mean(0)
            start = end
    return np.stack([bon_weights(len(s), n) @ v for n in ns])


def gao_fit(kl: np.ndarray, gain: np.ndarray) -> tuple[float, float]:
    """Least squares of Gao et al.'s best-of-n form, gain = d (alpha - beta d) with d = sqrt(KL)."""
    d = np.sqrt(np.asarray(kl, dtype=float))
    a = np.stack([d, -d * d], 1)
    (alpha, beta), *_ = np.linalg.lstsq(a, np.asarray(gain, dtype=float), rcond=None)
    return float(alpha), float(beta)


def drawdown(curve: np.ndarray) -> tuple[int, int]:
    """Indices (i, j), i <= j, of the largest fall curve[i] - curve[j] as n grows (0 when it never falls).
    Unlike the drop from the global peak to n = N it also sees a fall that the curve later climbs back from."""
    best, frm, to, top = 0.0, 0, 0, 0
    for j in range(len(curve)):
        if curve[j] > curve[top]:
            top = j
        if curve[top] - curve[j] > best:
            best, frm, to = float(curve[top] - curve[j]), top, j
    return frm, to


def curve_summary(ns: list[int], per_prompt: np.ndarray) -> dict[str, Any]:
    """Numbers of one curve from its per-prompt expectations [P, len(ns), len(VALUES)]."""
    true = per_prompt[:, :, 0]
    mean = true.mean(0)
    k = int(np.argmax(mean))
    i, j = drawdown(mean)
    drop = true[:, k] - true[:, -1]  # per prompt, at the peak of the mean curve
    dip = true[:, i] - true[:, j]
    se = lambda x: float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
    kls = kl_bon(ns)
    alpha, beta = gao_fit(kls, mean - mean[0])
    return {
        "true_at_1": float(mean[0]),
        "peak_true_reward": float(mean[k]),
        "n_at_peak": int(ns[k]),
        "kl_at_peak": float(kls[k]),
        "true_at_max_n": float(mean[-1]),
        "drop_peak_to_max_n": float(mean[k] - mean[-1]),
        "drop_se": se(drop),
        "max_drawdown": float(mean[i] - mean[j]),
        "drawdown_from_n": int(ns[i]),
        "drawdown_to_n": int(ns[j]),
        "drawdown_se": se(dip),
        "proxy_at_1": float(per_prompt[:, 0, 1].mean()),
        "proxy_at_max_n": float(per_prompt[:, -1, 1].mean()),
        "flattery_at_max_n": float(per_prompt[:, -1, 3].mean()),
        "gao_alpha": alpha,
        "gao_beta": beta,
    }


# ---------------------------------------------------------------------------------------------- the pool
def simulator_settings(run_cfg: Any, hack_rate: float | None) -> tuple[SimulatorConfig, float, int, bool]:
    """(generator settings, val_fraction, data seed, whether held-out prompts are known) from a training run."""
    data = run_cfg.get("data", {}) if run_cfg is not None else {}
    known = data.get("source") == "simulator"
    sim = dict(data.get("simulator", {}) or {}) if known else {}
    names = {f.name for f in fields(SimulatorConfig)}
    cfg = SimulatorConfig(**{k: v for k, v in sim.items() if k in names})
    if hack_rate is not None:
        cfg.hack_rate = hack_rate
    return cfg, float(data.get("val_fraction", 0.0) or 0.0), int(data.get("seed", 0) or 0), known


def draw_pools(sim: SimulatorConfig, prompts: int, pool: int, seed: int, held_out) -> list[dict]:
    """``prompts`` held-out prompts (``held_out(text) -> bool``), each with ``pool`` generator responses."""
    rng = random.Random(f"rmlab.bon:{seed}")
    out, tries = [], 0
    while len(out) < prompts:
        tries += 1
        if tries > 1000 * prompts:
            raise ValueError(f"found only {len(out)} held-out prompts in {tries} draws; lower --prompts")
        p = draw_prompt(rng, sim)
        if not held_out(p.text):
            continue
        rs = [draw_response(rng, sim, p) for _ in range(pool)]
        out.append({
            "prompt": p.text,
            "texts": [r.text for r in rs],
            "values": np.array([[r.true_reward, 0.0, r.perceived, r.flattery] for r in rs], dtype=float),
        })
    return out


def score_pools(scorer: Any, pools: list[dict]) -> list[np.ndarray]:
    """The model's score of every pool response, through ``rmlab.score.Scorer`` (each distinct text once)."""
    items, index = [], []
    for p in pools:
        uniq = list(dict.fromkeys(p["texts"]))
        pos = {t: i for i, t in enumerate(uniq)}
        items.append((p["prompt"], uniq))
        index.append(np.array([pos[t] for t in p["texts"]]))
    rewards = scorer.score(items)
    return [np.asarray(r, dtype=float)[ix] for r, ix in zip(rewards, index)]


def curves_for(name: str, scores: list[np.ndarray], pools: list[dict], ns: list[int], **meta: Any) -> dict:
    per = []
    for s, p in zip(scores, pools):
        v = p["values"].copy()
        v[:, 1] = s
        per.append(bon_expectation(s, v, ns))
    per = np.stack(per)  # [P, len(ns), V]
    mean = per.mean(0)
    se = per.std(0, ddof=1) / math.sqrt(len(per)) if len(per) > 1 else np.full_like(mean, np.nan)
    out = {"name": name, **meta, "n": list(ns), "kl": kl_bon(ns).tolist()}
    for j, v in enumerate(VALUES):
        out[v], out[v + "_se"] = mean[:, j].tolist(), se[:, j].tolist()
    out["summary"] = curve_summary(ns, per)
    out["_per_prompt_true"] = per[:, :, 0]
    return out


# ---------------------------------------------------------------------------------------------- outputs
def plot(curves: list[dict], oracle: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(curves):
        kl, col = np.array(c["kl"]), cmap(i % 10)
        lab = c["name"]
        t, tse = np.array(c["true"]), np.array(c.get("true_se", np.zeros(len(kl))))
        axes[0].plot(kl, t, "-o", ms=3, color=col, label=lab)
        if np.isfinite(tse).all():
            axes[0].fill_between(kl, t - tse, t + tse, color=col, alpha=0.15)
        axes[1].plot(kl, c["proxy"], "--o", ms=3, color=col, label=lab)
        axes[2].plot(kl, c["flattery"], "-o", ms=3, color=col, label=lab)
    if oracle is not None:
        axes[0].plot(oracle["kl"], oracle["true"], ":", color="k", label="picked by the true reward (ceiling)")
    axes[0].set_title("true reward of the pick (gold)")
    axes[1].set_title("proxy reward of the pick (the model's score)")
    axes[2].set_title("flattering sentences in the pick (the hack)")
    for ax in axes:
        ax.set_xlabel("KL_bon = log n - (n-1)/n  (nats)")
        top = ax.secondary_xaxis("top", functions=(lambda x: x, lambda x: x))
        ticks = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= max(curves[0]["n"])]
        top.set_xticks(kl_bon(ticks).tolist())
        top.set_xticklabels([str(n) for n in ticks], fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title + "   (top axis: n)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, curves: list[dict], oracle: dict, info: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in c.items() if not k.startswith("_")} for c in curves]
    metrics = {
        "info": info,
        "summary": {c["name"]: c["summary"] for c in clean},
        "curves": clean,
        "oracle": {k: v for k, v in oracle.items() if not k.startswith("_")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["curve", "seed", "n", "kl", *[x for v in VALUES for x in (v, v + "_se")]])
        for c in [*clean, metrics["oracle"]]:
            for j, n in enumerate(c["n"]):
                w.writerow([c["name"], c.get("seed", ""), n, c["kl"][j],
                            *[c[x][j] for v in VALUES for x in (v, v + "_se")]])
    plot(curves, oracle, out / "bon.png", f"best-of-n, {info['prompts']} held-out prompts x {info['pool']} samples")
    return metrics


def summary_table(summary: dict[str, dict]) -> str:
    head = ("| curve | true @ n=1 | peak true | n at peak | true @ max n | drop peak -> max n (± se) | "
            "largest fall (± se) | from n -> to n | proxy @ max n | flattery @ max n |")
    rows = [head, "|" + "---|" * 10]
    for name, s in summary.items():
        rows.append(
            f"| {name} | {s['true_at_1']:.3f} | {s['peak_true_reward']:.3f} | {s['n_at_peak']} | "
            f"{s['true_at_max_n']:.3f} | {s['drop_peak_to_max_n']:.3f} ± {s['drop_se']:.3f} | "
            f"{s['max_drawdown']:.3f} ± {s['drawdown_se']:.3f} | {s['drawdown_from_n']} -> {s['drawdown_to_n']} | "
            f"{s['proxy_at_max_n']:.3f} | {s['flattery_at_max_n']:.2f} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- summarize
def summarize(dirs: list[str], out: Path) -> str:
    """Curves of several bon runs (same prompts and pools: the same --seed, --prompts, --pool and data) side by
    side: each arm (a label, or a label's ensemble combination) as mean ± std over its seeds, and each ensemble
    minus its own members, paired on the same prompts."""
    runs = []
    for d in dirs:
        p = Path(d) / "metrics.json"
        if not p.is_file():
            raise SystemExit(f"rmlab.bon --summarize: {p} does not exist; run python -m rmlab.bon --out {d} first")
        runs.append(json.loads(p.read_text()))
    grids = {d: r["curves"][0]["n"] if r.get("curves") else None for d, r in zip(dirs, runs)}
    if len({json.dumps(g) for g in grids.values()}) > 1:  # curves over different n cannot be averaged or overlaid
        pools = ", ".join(f"{d}: --pool {r['info'].get('pool')}" for d, r in zip(dirs, runs))
        raise SystemExit(f"rmlab.bon --summarize: the runs were drawn with different pools ({pools}), so their curves "
                         "run over different n; rerun them with the same --pool (and --prompts, --seed) to compare")
    arms: dict[str, list[dict]] = {}
    for r in runs:
        for c in r["curves"]:
            arms.setdefault(c["arm"], []).append(c)
    lines = ["| arm | models | true @ n=1 | peak true | n at peak | true @ max n | drop peak -> max n | largest fall | "
             "from n -> to n |", "|" + "---|" * 9]

    def ms(xs: list[float], f: str = ".3f") -> str:
        a = np.asarray(xs, dtype=float)
        return f"{a.mean():{f}} ± {a.std(ddof=1):{f.lstrip('+')}}" if len(a) > 1 else f"{a.mean():{f}}"

    for arm, cs in arms.items():
        s = [c["summary"] for c in cs]
        lines.append(
            f"| {arm} | {len(cs)} | {ms([x['true_at_1'] for x in s])} | {ms([x['peak_true_reward'] for x in s])} | "
            f"{', '.join(str(x['n_at_peak']) for x in s)} | {ms([x['true_at_max_n'] for x in s])} | "
            f"{ms([x['drop_peak_to_max_n'] for x in s])} | {ms([x['max_drawdown'] for x in s])} | "
            f"{', '.join(str(x['drawdown_from_n']) + '->' + str(x['drawdown_to_n']) for x in s)} |"
        )
    paired = ["", "Ensembles minus their own members (same prompts and pools; mean ± std over the members):", "",
              "| ensemble | members | peak true | true @ max n | drop peak -> max n | largest fall |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        members = [c for c in r["curves"] if c.get("kind") == "member"]
        for c in r["curves"]:
            if c.get("kind") != "ensemble" or not members:
                continue
            keys = ("peak_true_reward", "true_at_max_n", "drop_peak_to_max_n", "max_drawdown")
            d = {k: [c["summary"][k] - m["summary"][k] for m in members] for k in keys}
            paired.append(f"| {c['arm']} | {len(members)} | " + " | ".join(ms(d[k], "+.3f") for k in keys) + " |")
    # Every other arm minus the first, paired by seed (same data and pools: the seed is the model's only change).
    keys = ("peak_true_reward", "true_at_max_n", "drop_peak_to_max_n", "max_drawdown")
    names = list(arms)
    by_seed = {arm: {c["seed"]: c["summary"] for c in cs if c.get("seed") is not None} for arm, cs in arms.items()}
    vs = ["", f"Arms minus `{names[0]}`, paired by seed (mean ± std over the shared seeds):", "",
          "| arm | seeds | peak true | true @ max n | drop peak -> max n | largest fall |", "|---|---|---|---|---|---|"]
    for arm in names[1:]:
        common = sorted(set(by_seed[arm]) & set(by_seed[names[0]]))
        if not common:
            continue
        d = {k: [by_seed[arm][sd][k] - by_seed[names[0]][sd][k] for sd in common] for k in keys}
        vs.append(f"| {arm} | {', '.join(map(str, common))} | " + " | ".join(ms(d[k], "+.3f") for k in keys) + " |")
    text = "\n".join(lines + (paired if len(paired) > 5 else []) + (vs if len(vs) > 5 else []))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bon_summary.md").write_text(text + "\n")
    # one curve per arm: the mean over its seeds
    merged = []
    for arm, cs in arms.items():
        m = {"name": f"{arm} (n={len(cs)})", "n": cs[0]["n"], "kl": cs[0]["kl"]}
        for v in VALUES:
            m[v] = np.mean([c[v] for c in cs], 0).tolist()
        m["true_se"] = (np.std([c["true"] for c in cs], 0, ddof=1) if len(cs) > 1 else np.zeros(len(m["n"]))).tolist()
        merged.append(m)
    info = runs[0]["info"]
    plot(merged, runs[0].get("oracle"), out / "bon_summary.png",
         f"best-of-n by arm (band: std over seeds), {info['prompts']} held-out prompts x {info['pool']} samples")
    return text


# ---------------------------------------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m rmlab.bon",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", action="append", default=[], help="an export dir (<run>/export); repeat for several")
    ap.add_argument("--ckpt", action="append", default=[], help="a Lightning checkpoint of a run; repeatable")
    ap.add_argument(
        "--combine", default="mean,min,uwo",
        help="with several models, the ensembles to add (comma list of mean, min, uwo; `none` = each model alone)",
    )
    ap.add_argument("--lam", type=float, default=1.0, help="uwo's lambda (normalized reward units)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts (each gets its own pool of --pool samples)")
    ap.add_argument("--pool", type=int, default=256, help="generator samples per prompt: n runs from 1 to this")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and pools (same seed = same pools)")
    ap.add_argument("--hack-rate", type=float, default=None, help="the generator's hack_rate (default: the run's)")
    ap.add_argument("--label", default=None, help="the arm name in the outputs (default: the run's loss)")
    ap.add_argument("--out", "-o", default=None, help="output dir (default: <first model's run dir>/bon)")
    ap.add_argument("--summarize", nargs="+", metavar="BON_DIR", help="compare finished bon dirs; writes to --out (default: outputs/bon/summary)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per forward at most")
    ap.add_argument("--max-tokens", type=int, default=16384, help="padded tokens per forward at most")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is best on busy shared cores)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)

    if a.summarize:
        out = Path(a.out or "outputs/bon/summary")
        print(summarize(a.summarize, out))
        print(f"rmlab.bon: wrote {out / 'bon_summary.md'}, {out / 'bon_summary.png'}", file=sys.stderr)  # where, said
        return
    paths = [*a.model, *a.ckpt]
    if not paths:
        ap.error("give a model: --model <run>/export or --ckpt <run>/checkpoints/last.ckpt (repeat for an ensemble)")
    combos = [c for c in a.combine.split(",") if c and c != "none"]
    bad = [c for c in combos if c not in ("mean", "min", "uwo")]
    if bad:
        ap.error(f"--combine: {bad} are not among mean, min, uwo, none")
    if a.pool < 1 or a.prompts < 1:
        ap.error("--pool and --prompts must be >= 1")

    import torch
    import transformers

    from rmlab.checkpoint import CheckpointError  # torch, lightning: after the arguments parse
    from rmlab.data.datamodule import in_val  # likewise (lightning)
    from rmlab.evaluate import load_member  # likewise
    from rmlab.models.ensemble import combine, member_stats  # likewise
    from rmlab.score import Scorer  # likewise

    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    try:
        loaded = [load_member(p) for p in paths]
    except CheckpointError as e:
        raise SystemExit(f"rmlab.bon: {e}") from None
    run_cfg = loaded[0][2]
    sim, frac, data_seed, known = simulator_settings(run_cfg, a.hack_rate)
    for p, (_, _, rc) in zip(paths[1:], loaded[1:]):
        other = simulator_settings(rc, a.hack_rate)
        if other[1:3] != (frac, data_seed):
            print(f"rmlab.bon: warning: {p} held out other prompts (val_fraction/seed {other[1:3]} vs "
                  f"{(frac, data_seed)}); prompts held out by the first model may be training prompts of it",
                  file=sys.stderr)
    if known and frac > 0:
        held_out = lambda text: in_val(text, frac, data_seed)  # noqa: E731
    else:
        print("rmlab.bon: warning: the model's run did not train on the simulator with a val split; every "
              "simulator prompt counts as held out", file=sys.stderr)
        held_out = lambda text: True  # noqa: E731
    pools = draw_pools(sim, a.prompts, a.pool, a.seed, held_out)
    ns = n_grid(a.pool)

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_cfg = run_cfg.get("data", {}) if run_cfg is not None else {}
    raw, normalized = [], []
    for i, (p, (model, meta, _)) in enumerate(zip(paths, loaded)):
        scorer = Scorer(model, data_cfg.get("max_length") or 512, data_cfg.get("min_prompt_tokens", 16),
                        batch_size=a.batch_size, max_tokens=a.max_tokens, device=device, progress=not a.no_progress)
        print(f"rmlab.bon: scoring the pools with model {i + 1}/{len(paths)} ({p})", file=sys.stderr)
        raw.append(score_pools(scorer, pools))
        normalized.append("reward_mean" in meta and "reward_std" in meta)

    def arm_of(rc: Any) -> str:
        if a.label:
            return a.label
        target = str(rc.get("loss", {}).get("_target_", "model")) if rc is not None else "model"
        return target.rsplit(".", 1)[-1].removesuffix("Loss").lower() or "model"

    curves = []
    for i, (p, (_, meta, rc)) in enumerate(zip(paths, loaded)):
        seed = rc.get("seed") if rc is not None else None
        name = arm_of(rc) + (f" seed {seed}" if seed is not None else f" #{i + 1}")
        if any(c["name"] == name for c in curves):  # two members of one recipe and seed: each keeps its own row
            name = f"{name} #{i + 1}"
        # The proxy in the model's normalized units when its export has val statistics (as the ensembles'),
        # so curves of different models share a scale; the pick depends only on the order either way.
        mu, sd = member_stats(meta, p) if normalized[i] else (0.0, 1.0)
        scores = [(r - mu) / sd for r in raw[i]]
        curves.append(curves_for(name, scores, pools, ns, arm=arm_of(rc), seed=seed, model=p, kind="member"))
    if len(paths) > 1 and combos:
        stats = [member_stats(meta, p) for p, (_, meta, _) in zip(paths, loaded)]
        for how in combos:
            combined = []
            for j in range(len(pools)):
                z = torch.tensor(np.stack([(raw[i][j] - stats[i][0]) / stats[i][1] for i in range(len(paths))]))
                combined.append(combine(z, how, a.lam).numpy().astype(float))
            arm = f"{arm_of(run_cfg)} ensemble-{how}" + (f"(lam={a.lam:g})" if how == "uwo" else "")
            curves.append(curves_for(arm, combined, pools, ns, arm=arm, seed=None, model=paths, kind="ensemble"))
    oracle = curves_for("picked by the true reward", [pl["values"][:, 0] for pl in pools], pools, ns, kind="oracle")

    first = Path(paths[0]).resolve()  # <run>/export or <run>/checkpoints/last.ckpt
    run_dir = first.parent.parent if first.is_file() else first.parent
    out = Path(a.out) if a.out else (run_dir / "bon" if run_cfg is not None else
                                     Path("outputs/bon") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    info = {
        "models": paths,
        "prompts": a.prompts,
        "pool": a.pool,
        "seed": a.seed,
        "held_out_by": {"val_fraction": frac, "data_seed": data_seed} if known and frac > 0 else None,
        "simulator": {f.name: getattr(sim, f.name) for f in fields(SimulatorConfig) if f.name != "num_prompts"},
        "combine": combos if len(paths) > 1 else [],
        "proxy_units": ["normalized by the export's val statistics" if z else "raw reward" for z in normalized],
        "lam": a.lam,
        "distinct_responses_per_prompt": float(np.mean([len(set(pl["texts"])) for pl in pools])),
        "seconds": round(time.time() - t0, 1),
    }
    metrics = write_outputs(out, curves, oracle, info)
    print(summary_table(metrics["summary"]))
    print(f"rmlab.bon: {a.prompts} prompts x {a.pool} samples in {info['seconds']} s -> {out}/metrics.json, "
          f"{out}/bon.png; compare runs with python -m rmlab.bon --summarize <dir> <dir> ...", file=sys.stderr)


if __name__ == "__main__":
    main()
