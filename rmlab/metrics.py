"""Evaluation metrics for a reward model, as pure functions over numpy arrays.

The unit is the *comparison* (winner, loser, tie flag) inside a *group* (one prompt, K responses), the
same contract as ``RewardBatch``. ``PredictionCollector`` gathers rewards batch by batch;
``compute_all`` turns them into one flat ``{name: float}`` dict (logged as ``val/<name>`` during
training, written to ``metrics.json`` by ``eval.py``) plus the tables the report plots.

Conventions, so every number means one thing:

- **accuracy is strict**: a comparison counts as correct only when ``r_w > r_l``; a predicted tie
  (``r_w == r_l``) is wrong. Comparisons labelled as ties are left out of accuracy and reported
  apart as ``tie_rate`` (share of comparisons labelled tie). ``pred_tie_rate`` is the share of
  non-tie comparisons the model scores exactly equal.
- **calibration** reads ``p = sigmoid(r_w - r_l)`` as the probability that the labelled winner wins.
  Each non-tie comparison is counted in both orientations, ``(p, 1)`` and ``(1 - p, 0)``, so the
  reliability diagram spans [0, 1] and does not depend on which side a file happened to list first.
  ECE = sum_b n_b / N * |mean p_b - mean y_b| over equal-width bins; Brier = mean (p - 1)^2. The bins
  are mirror images: p and 1 - p always land in mirrored bins (``calibration_bins``), also on a bin
  edge, so the ECE is the same whichever side of each comparison is taken as the winner.
- **rank correlations** (Kendall tau-b, Spearman rho) are computed within each group of K >= 3
  responses and averaged over groups; across prompts rewards need not be comparable. A group whose
  labels are constant is skipped (no ranking to compare); a group the model scores constant counts
  as correlation 0 (a constant model ranks nothing, it is not absent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NAN = float("nan")


# --------------------------------------------------------------------------- predictions
@dataclass
class Predictions:
    """Rewards of every response and the labelled comparisons among them, as flat arrays."""

    reward: np.ndarray  # [N] float
    group: np.ndarray  # [N] int, index into group_ids
    response_len: np.ndarray  # [N] response tokens
    true_reward: np.ndarray  # [N] simulator truth, NaN = unknown
    rank: np.ndarray  # [N] 0 = best, NaN = unranked
    winner: np.ndarray  # [C] index into the responses
    loser: np.ndarray  # [C]
    tie: np.ndarray  # [C] bool
    margin: np.ndarray  # [C] NaN = none
    strength: np.ndarray  # [C] -1 = none
    subset: np.ndarray  # [C] str ('' = none)
    group_ids: list[str] = field(default_factory=list)
    tokens: list[tuple[list[int], list[int]]] | None = None  # per response (prompt ids, response ids)
    texts: list[str] | None = None  # per response: the critique a writing model generated before scoring it

    @property
    def rw(self) -> np.ndarray:
        return self.reward[self.winner]

    @property
    def rl(self) -> np.ndarray:
        return self.reward[self.loser]


class PredictionCollector:
    """Accumulates ``(rewards, RewardBatch)`` pairs; response and group indices are made global.

    keep_tokens: also keep each response's token ids, so the report can show the worst comparisons.
    """

    def __init__(self, keep_tokens: bool = False):
        self.keep_tokens = keep_tokens
        self.reset()

    def reset(self) -> None:
        self._resp: dict[str, list[np.ndarray]] = {
            k: [] for k in ("reward", "group", "response_len", "true_reward", "rank")
        }
        self._cmp: dict[str, list[np.ndarray]] = {
            k: [] for k in ("winner", "loser", "tie", "margin", "strength", "subset")
        }
        self._group_ids: list[str] = []
        self._tokens: list[tuple[list[int], list[int]]] = []
        self._texts: list[str] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, rewards: Any, batch: Any, texts: list[str] | None = None) -> None:
        """``texts``: the critiques a writing model generated for these rows (rmlab.models.reasoning), kept for
        the report's worst comparisons."""
        def np_(t):
            return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()

        r = np_(rewards).astype(np.float64).reshape(-1)
        if r.shape[0] != batch.input_ids.shape[0]:
            raise ValueError(f"{r.shape[0]} rewards for a batch of {batch.input_ids.shape[0]} responses")
        off, goff = self._n, len(self._group_ids)
        self._resp["reward"].append(r)
        self._resp["group"].append(np_(batch.group_index) + goff)
        self._resp["response_len"].append(np_(batch.response_len))
        self._resp["true_reward"].append(np_(batch.true_reward).astype(np.float64))
        self._resp["rank"].append(np_(batch.rank).astype(np.float64))
        self._cmp["winner"].append(np_(batch.winner) + off)
        self._cmp["loser"].append(np_(batch.loser) + off)
        self._cmp["tie"].append(np_(batch.tie).astype(bool))
        self._cmp["margin"].append(np_(batch.margin).astype(np.float64))
        self._cmp["strength"].append(np_(batch.strength))
        subsets = list(batch.subsets) or [""] * batch.num_groups
        self._cmp["subset"].append(np.array([subsets[g] or "" for g in batch.cmp_group.tolist()], dtype=object))
        self._group_ids += list(batch.group_ids)
        if self.keep_tokens:
            ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()
            plen = batch.prompt_len.tolist() if batch.prompt_len is not None else [0] * ids.shape[0]
            for row, m, p, n in zip(ids, mask, plen, batch.response_len.tolist()):
                real = row[m].tolist()
                self._tokens.append((real[:p], real[p : p + n]))  # a row's critique is not its response
        if texts is not None:
            self._texts += list(texts)
        self._n += r.shape[0]

    def result(self) -> Predictions:
        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        R, C = self._resp, self._cmp
        return Predictions(
            reward=cat(R["reward"], np.float64),
            group=cat(R["group"], np.int64),
            response_len=cat(R["response_len"], np.int64),
            true_reward=cat(R["true_reward"], np.float64),
            rank=cat(R["rank"], np.float64),
            winner=cat(C["winner"], np.int64),
            loser=cat(C["loser"], np.int64),
            tie=cat(C["tie"], bool),
            margin=cat(C["margin"], np.float64),
            strength=cat(C["strength"], np.int64),
            subset=cat(C["subset"], object),
            group_ids=list(self._group_ids),
            tokens=list(self._tokens) if self.keep_tokens else None,
            texts=list(self._texts) if self._texts and len(self._texts) == self._n else None,
        )


def concat_predictions(parts: list[Predictions]) -> Predictions:
    """One set of predictions from several (e.g. every DDP rank's share of the val set), in the given order.

    Response indices (``winner``, ``loser``) and group indices are shifted past the parts before them, so
    every metric of the result is the metric of all the data at once."""
    parts = list(parts)
    if not parts:
        return PredictionCollector().result()
    if len(parts) == 1:
        return parts[0]
    resp_off = np.cumsum([0] + [p.reward.size for p in parts])[:-1]
    group_off = np.cumsum([0] + [len(p.group_ids) for p in parts])[:-1]

    def cat(name: str, shift: np.ndarray | None = None) -> np.ndarray:
        arrays = [getattr(p, name) if shift is None else getattr(p, name) + shift[i] for i, p in enumerate(parts)]
        return np.concatenate(arrays)

    # A part with no responses (a rank that scored nothing) carries no tokens either way.
    keep_tokens = all(p.tokens is not None for p in parts if p.reward.size) and any(p.tokens is not None for p in parts)
    return Predictions(
        reward=cat("reward"),
        group=cat("group", group_off),
        response_len=cat("response_len"),
        true_reward=cat("true_reward"),
        rank=cat("rank"),
        winner=cat("winner", resp_off),
        loser=cat("loser", resp_off),
        tie=cat("tie"),
        margin=cat("margin"),
        strength=cat("strength"),
        subset=cat("subset"),
        group_ids=[g for p in parts for g in p.group_ids],
        tokens=[t for p in parts for t in (p.tokens or [])] if keep_tokens else None,
        texts=[t for p in parts for t in p.texts] if all(p.texts is not None for p in parts) else None,
    )


# --------------------------------------------------------------------------- accuracy
def strict_accuracy(rw: np.ndarray, rl: np.ndarray, tie: np.ndarray) -> dict[str, float]:
    """Strict accuracy over non-tie comparisons; labelled ties reported apart, never as wins."""
    rw, rl, tie = np.asarray(rw, float), np.asarray(rl, float), np.asarray(tie, bool)
    nt = ~tie
    n = int(nt.sum())
    return {
        "acc": float((rw[nt] > rl[nt]).mean()) if n else NAN,
        "tie_rate": float(tie.mean()) if tie.size else NAN,
        "pred_tie_rate": float((rw[nt] == rl[nt]).mean()) if n else NAN,
        "n_comparisons": float(n),
        "n_ties": float(tie.sum()),
    }


def accuracy_by(correct: np.ndarray, keys: np.ndarray) -> dict[str, tuple[float, int]]:
    """{key: (accuracy, count)} over the values of ``keys`` (sorted by key)."""
    correct, keys = np.asarray(correct, float), np.asarray(keys)
    out = {}
    for k in sorted(set(keys.tolist()), key=str):
        sel = keys == k
        out[str(k)] = (float(correct[sel].mean()), int(sel.sum()))
    return out


def section_scores(
    by_subset: dict[str, tuple[float, int]], sections: dict[str, list[str]] | None = None
) -> dict[str, float]:
    """RewardBench-style sections: a section's score is its subsets' accuracies weighted by their
    example counts (= accuracy over the section's pooled examples); ``score`` is the plain mean of
    the sections, so a big section does not drown a small one. Without ``sections`` every subset is
    its own section. Subsets named in no section are ignored."""
    if not sections:
        sections = {s: [s] for s in by_subset}
    out: dict[str, float] = {}
    for name, members in sections.items():
        present = [by_subset[s] for s in members if s in by_subset]
        n = sum(c for _, c in present)
        if n:
            out[name] = sum(a * c for a, c in present) / n
    out["score"] = float(np.mean(list(out.values()))) if out else NAN
    return out


def quantile_buckets(x: np.ndarray, n: int = 4) -> tuple[np.ndarray, list[float]]:
    """Labels ``q1..qn`` by quantiles of x (NaN -> ''), and the edges used."""
    x = np.asarray(x, float)
    ok = np.isfinite(x)
    labels = np.full(x.shape, "", dtype=object)
    if not ok.any():
        return labels, []
    edges = np.unique(np.quantile(x[ok], np.linspace(0, 1, n + 1)))
    if len(edges) < 2:
        labels[ok] = "q1"
        return labels, [float(edges[0]), float(edges[0])]
    idx = np.clip(np.searchsorted(edges, x[ok], side="right") - 1, 0, len(edges) - 2)
    labels[ok] = np.array([f"q{i + 1}" for i in idx], dtype=object)
    return labels, [float(e) for e in edges]


# --------------------------------------------------------------------------- calibration
def calibration_bins(probs: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """The bin of each probability among ``n_bins`` equal-width bins of [0, 1], mirror-symmetric.

    Below 1/2 a bin holds [i/n, (i+1)/n), above 1/2 it holds (i/n, (i+1)/n]: an edge belongs to the bin
    nearer 1/2, so p and 1 - p land in bins b and n - 1 - b even when p is on an edge (p = 0.8 and
    0.2 with 10 bins: bins 7 and 2). 1/2 itself is in bin n // 2. p * n within 1e-9 of an integer
    counts as on the edge, so that 1 - (1 - p) != p in floating point does not move a point.
    """
    probs = np.asarray(probs, float)

    def scaled(q: np.ndarray) -> np.ndarray:
        x = q * n_bins
        r = np.round(x)
        return np.where(np.abs(x - r) <= 1e-9, r, x)

    lo, hi = scaled(probs), scaled(1.0 - probs)
    low_half = lo < n_bins / 2
    high_half = hi < n_bins / 2
    idx = np.full(probs.shape, n_bins // 2, dtype=int)
    idx[low_half] = np.floor(lo[low_half]).astype(int)
    idx[high_half & ~low_half] = n_bins - 1 - np.floor(hi[high_half & ~low_half]).astype(int)
    return np.clip(idx, 0, n_bins - 1)


def expected_calibration_error(probs: np.ndarray, ys: np.ndarray, n_bins: int = 10) -> tuple[float, list[dict]]:
    """ECE = sum_b n_b / N * |mean p_b - mean y_b| over ``calibration_bins``, and the bins."""
    probs, ys = np.asarray(probs, float), np.asarray(ys, float)
    idx = calibration_bins(probs, n_bins)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        cnt = int(sel.sum())
        conf = float(probs[sel].mean()) if cnt else NAN
        acc = float(ys[sel].mean()) if cnt else NAN
        if cnt:
            ece += cnt / probs.size * abs(conf - acc)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "confidence": conf, "accuracy": acc, "count": cnt})
    return float(ece), bins


def calibration(gap: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """ECE, Brier and reliability bins of ``p = sigmoid(gap)``, gap = r_w - r_l on non-tie comparisons.

    Symmetrized: each comparison is the point (p, 1) and the point (1 - p, 0). The bins are
    ``calibration_bins``: mirror images of each other, so the two points land in mirrored bins, also
    for p on a bin edge, and the result is the same for the comparison taken the other way round
    (sigmoid(-gap), 0). A calibrated set on an edge (p = 0.8, 80% won) has ECE 0.
    """
    gap = np.asarray(gap, float)
    if gap.size == 0:
        return {"ece": NAN, "brier": NAN, "bins": []}
    p = 1.0 / (1.0 + np.exp(-gap))
    probs = np.concatenate([p, 1.0 - p])
    ys = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    ece, bins = expected_calibration_error(probs, ys, n_bins)
    return {"ece": ece, "brier": float(np.mean((p - 1.0) ** 2)), "bins": bins}


# --------------------------------------------------------------------------- correlations
def pearson(x: Any, y: Any, min_n: int = 2) -> float:
    """Pearson correlation over the pairs where both are finite (arrays or tensors); NaN with fewer than
    ``min_n`` such pairs or when either side is constant."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < max(2, min_n) or x.std() == 0 or y.std() == 0:
        return NAN
    return float(np.corrcoef(x, y)[0, 1])


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties share the mean of their positions."""
    from scipy.stats import rankdata as _rd

    return _rd(np.asarray(x, float))


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b: sum_{i<j} s_x s_y / sqrt(sum s_x^2 * sum s_y^2), s = sign of the pair difference.

    Tau-b because ties in either ranking shrink the denominator instead of counting as agreement."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    iu = np.triu_indices(x.size, k=1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    den = math.sqrt(float((sx * sx).sum()) * float((sy * sy).sum()))
    return float((sx * sy).sum() / den) if den > 0 else NAN


def group_rank_correlation(
    score: np.ndarray, target: np.ndarray, group: np.ndarray, min_k: int = 3
) -> dict[str, float]:
    """Mean Kendall tau-b and Spearman rho between score and target within each group.

    Groups with fewer than ``min_k`` scored responses, or a constant target, have no ranking to
    compare and are skipped (``n_groups`` says how many counted). A group where the *score* is
    constant is counted with tau = rho = 0: a constant model is maximally uninformative, and leaving
    it out would average only over the groups it does rank. Higher target = better.
    """
    score, target, group = np.asarray(score, float), np.asarray(target, float), np.asarray(group)
    ok = np.isfinite(target)
    taus, rhos = [], []
    if ok.any():
        order = np.argsort(group[ok], kind="stable")
        s, t, g = score[ok][order], target[ok][order], group[ok][order]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], g.size]):
            if b - a < min_k or np.all(t[a:b] == t[a]):
                continue
            # The target varies, so NaN means a constant score: it ranks nothing, correlation 0.
            tau = kendall_tau_b(s[a:b], t[a:b])
            rho = spearman_rho(s[a:b], t[a:b])
            taus.append(0.0 if math.isnan(tau) else tau)
            rhos.append(0.0 if math.isnan(rho) else rho)
    return {
        "kendall_tau": float(np.mean(taus)) if taus else NAN,
        "spearman_rho": float(np.mean(rhos)) if rhos else NAN,
        "n_groups": float(len(taus)),
    }


# --------------------------------------------------------------------------- length bias
def length_bias(pred: Predictions) -> dict[str, float]:
    """Does the model reward length? Correlation of reward with response length, and strict
    accuracy split by whether the labelled winner is the longer response."""
    nt = ~pred.tie
    lw, ll = pred.response_len[pred.winner][nt], pred.response_len[pred.loser][nt]
    correct = (pred.rw > pred.rl)[nt]
    longer, shorter = lw > ll, lw < ll
    return {
        "length/pearson": pearson(pred.reward, pred.response_len),
        "length/spearman": spearman_rho(pred.reward, pred.response_len) if pred.reward.size > 1 else NAN,
        "length/chosen_longer_rate": float(longer.mean()) if longer.size else NAN,
        "length/acc_chosen_longer": float(correct[longer].mean()) if longer.any() else NAN,
        "length/acc_chosen_shorter": float(correct[shorter].mean()) if shorter.any() else NAN,
        "length/acc_same_length": float(correct[lw == ll].mean()) if (lw == ll).any() else NAN,
    }


# --------------------------------------------------------------------------- simulator truth
def truth_metrics(pred: Predictions) -> dict[str, float]:
    """Against the simulator's true reward: correlations, and accuracy where the true reward is the
    label (``truth/acc``), next to the oracle's own accuracy on the noisy labels (the ceiling)."""
    t = pred.true_reward
    if t.size == 0 or not np.isfinite(t).all():
        return {}
    tw, tl = t[pred.winner], t[pred.loser]
    nt = ~pred.tie
    differ = tw != tl
    model_says = np.sign(pred.rw - pred.rl)
    return {
        "truth/pearson": pearson(pred.reward, t),
        "truth/spearman": spearman_rho(pred.reward, t),
        "truth/kendall_tau_group": group_rank_correlation(pred.reward, t, pred.group)["kendall_tau"],
        "truth/acc": float((model_says[differ] == np.sign(tw - tl)[differ]).mean()) if differ.any() else NAN,
        "truth/oracle_acc": float((tw[nt] > tl[nt]).mean()) if nt.any() else NAN,
    }


# --------------------------------------------------------------------------- everything
@dataclass
class EvalResult:
    scalars: dict[str, float]  # flat: logged as val/<name>, written to metrics.json
    tables: dict[str, Any]  # reliability bins, per-subset and per-bucket (acc, n), bucket edges


def compute_all(pred: Predictions, sections: dict[str, list[str]] | None = None, n_bins: int = 10) -> EvalResult:
    """Every metric of the report from one set of predictions."""
    s: dict[str, float] = {}
    tables: dict[str, Any] = {}
    s.update(strict_accuracy(pred.rw, pred.rl, pred.tie))
    nt = ~pred.tie
    correct = (pred.rw > pred.rl)[nt].astype(float)
    gap = (pred.rw - pred.rl)[nt]
    s["reward_mean"] = float(pred.reward.mean()) if pred.reward.size else NAN
    s["reward_std"] = float(pred.reward.std()) if pred.reward.size else NAN
    s["reward_gap"] = float(gap.mean()) if gap.size else NAN
    # The chosen and rejected reward distributions (the report's histogram): one value per non-tie
    # comparison, so a response in several comparisons counts once for each; population std.
    for side, r in (("chosen", pred.rw[nt]), ("rejected", pred.rl[nt])):
        s[f"reward/{side}_mean"] = float(r.mean()) if r.size else NAN
        s[f"reward/{side}_std"] = float(r.std()) if r.size else NAN

    cal = calibration(gap, n_bins)
    s["ece"], s["brier"] = cal["ece"], cal["brier"]
    tables["reliability"] = cal["bins"]

    subsets = pred.subset[nt]
    if subsets.size and any(subsets):
        by = accuracy_by(correct, subsets)
        tables["subset"] = by
        for k, (a, _) in by.items():
            s[f"subset/{k or 'none'}"] = a
        sec = section_scores(by, sections)
        tables["sections"] = sec
        for k, v in sec.items():
            s[f"section/{k}"] = v

    # Buckets: the data's strength, else its margin (quartiles), else the model's own |gap| (quartiles),
    # so there is always an accuracy-by-bucket view.
    strength, margin = pred.strength[nt], pred.margin[nt]
    if (strength >= 0).any():
        kind, keys, edges = "strength", np.where(strength >= 0, strength.astype(str), ""), None
    elif np.isfinite(margin).any():
        kind, (keys, edges) = "margin", quantile_buckets(np.abs(margin))
    else:
        kind, (keys, edges) = "confidence", quantile_buckets(np.abs(gap))
    if keys.size:
        by = {k: v for k, v in accuracy_by(correct, keys).items() if k}
        tables["buckets"] = {"kind": kind, "acc": by, "edges": edges}
        for k, (a, _) in by.items():
            s[f"bucket_{kind}/{k}"] = a

    s.update(length_bias(pred))
    grc = group_rank_correlation(pred.reward, -pred.rank, pred.group)  # rank 0 = best
    s.update({f"rank/{k}": v for k, v in grc.items()})
    s.update(truth_metrics(pred))
    return EvalResult(scalars=s, tables=tables)
