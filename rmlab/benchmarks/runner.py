"""``python eval.py benchmark=<name>``: load a model as eval.py does, build the benchmark's items, score them
through ``rmlab.score.Scorer``, apply the benchmark's rules, write the report (rmlab/benchmarks/report.py)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rmlab.benchmarks import best_of_k, rewardbench, rewardbench2, rm_bench
from rmlab.benchmarks.common import BenchResult, Item, first_per_subset, score_items
from rmlab.benchmarks.report import write
from rmlab.data.datamodule import in_val
from rmlab.data.types import DataReport
from rmlab.evaluate import find_run_config, load_reward_model, pick_split, trained_rows
from rmlab.runtime import start_run
from rmlab.score import Scorer
from rmlab.validate import ConfigError, Problem, check_config

log = logging.getLogger("rmlab")

BENCHMARKS = {"rewardbench": rewardbench, "rewardbench2": rewardbench2, "rm_bench": rm_bench, "best_of_k": best_of_k}


def check_benchmark(b: Any) -> None:
    """The benchmark's own keys, named like the rest of the config errors."""
    problems = []
    if b.get("name") not in BENCHMARKS:
        problems.append(Problem("benchmark.name", b.get("name"), f"one of {', '.join(BENCHMARKS)}"))
    for key, low in (("batch_size", 1), ("max_tokens", 1), ("max_per_subset", 1), ("max_length", 8), ("draws", 1)):
        v = b.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            problems.append(Problem(f"benchmark.{key}", v, f"an integer >= {low}" + (" or null" if key in (
                "max_per_subset", "max_length") else "")))
    if b.get("name") != "best_of_k" and not b.get("source"):
        problems.append(Problem("benchmark.source", b.get("source"), "a hub name or a local file/folder"))
    if problems:
        raise ConfigError(problems)


def max_length_for(model: Any, b: Any, run_cfg: DictConfig | None) -> int:
    """benchmark.max_length, else the training run's data.max_length, else what the model takes (<= 4096)."""
    if b.get("max_length"):
        return int(b.max_length)
    if run_cfg is not None and OmegaConf.select(run_cfg, "data.max_length") is not None:
        return int(OmegaConf.select(run_cfg, "data.max_length"))
    return min(4096, model.max_positions or 4096)


def best_of_k_items(cfg: DictConfig, model: Any, run_cfg: DictConfig | None) -> tuple[list[Item], list[str], dict]:
    """Groups of the data config (ratings or rankings), before any tokenization; the held-out prompts only when
    the data is the model's training data (``split``, as eval.py)."""
    from hydra.utils import instantiate  # the data config's datamodule, as eval.py builds it

    dm = instantiate(cfg.data, tokenizer=model.tokenizer, _convert_="all")
    report = DataReport(name=str(cfg.data.name))
    r = dm.records
    split = pick_split(cfg.split, cfg.data, run_cfg)
    if split == "val" and (r.val_source or r.val_split):
        groups = dm.load_groups(r.val_source or r.source, r.val_split or r.split, report)
    else:
        groups = dm.load_groups(r.source, r.split, report)
        if split == "val":
            groups = [g for g in groups if in_val(g.prompt, r.val_fraction, r.seed)]
    items, dropped = best_of_k.items_from_groups(groups)
    notes = [f"{v} prompt(s) left out: {k.replace('_', ' ')}" for k, v in dropped.items() if v]
    if not items:
        raise ValueError(f"data={cfg.data.name} has no prompt with 2+ responses of different gold scores: best-of-K "
                         "needs ratings or rankings data (data.format=ratings|rankings), e.g. data=alpaca_eval2")
    return items, notes, {"split": split, "dropped": dropped, "data": str(cfg.data.name)}


def score_benchmark(name: str, items: list[Item], rewards: list[list[float]], b: Any, extra: dict) -> BenchResult:
    if name == "rewardbench":
        return rewardbench.score(items, rewards, with_prior=bool(b.get("prior_sets")))
    if name == "best_of_k":
        ks = list(b.ks) if b.get("ks") else None
        return best_of_k.score(items, rewards, ks, int(b.draws), int(b.seed), extra.get("dropped"))
    return BENCHMARKS[name].score(items, rewards)


def run(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg, entry="eval")
    b = cfg.benchmark
    check_benchmark(b)
    out, t0 = start_run(cfg, resolve=False)
    ckpt = cfg.get("ckpt_path")
    name_or_path = OmegaConf.select(cfg, "model.name_or_path", throw_on_missing=False)
    run_cfg = find_run_config(ckpt or name_or_path)
    torch.manual_seed(int(cfg.seed or 0))  # a head that is not in the weights (model=minilm) starts the same each time
    model = load_reward_model(ckpt, cfg.model, run_cfg)
    if model.kind == "judge":
        raise ValueError("a pairwise judge gives no per-response reward; the benchmarks score each response "
                         "(use a scalar, verifier or attribute model)")
    extra: dict[str, Any] = {}
    if b.name == "best_of_k":
        items, notes, extra = best_of_k_items(cfg, model, run_cfg)
    else:
        items, notes = BENCHMARKS[b.name].load(b)
    items, left = first_per_subset(items, b.get("max_per_subset"))
    if left:
        notes.append(f"benchmark.max_per_subset={b.max_per_subset}: {left} examples not scored; not a leaderboard number")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Rows as training built them (the scoring contract): the run's config or the export's record says how.
    rows = trained_rows(ckpt or name_or_path, run_cfg)
    reward_token = rows["reward_token"]
    scorer = Scorer(model, max_length_for(model, b, run_cfg), int(rows["min_prompt_tokens"]),
                    batch_size=int(b.batch_size), max_tokens=int(b.max_tokens), device=device,
                    reward_token=reward_token)
    rewards = score_items(scorer, items)
    result = score_benchmark(b.name, items, rewards, b, extra)
    result.notes = notes + result.notes
    info = {
        "benchmark": b.name,
        "model": str(ckpt or name_or_path),
        "source": extra.get("data") or str(b.source),
        "examples": len(items),
        "responses": sum(len(r) for r in rewards),
        "max_length": scorer.max_length,
        "reward_token": reward_token,
        "seconds": round(time.time() - t0, 2),
        "run_dir": str(out),
        **{k: v for k, v in extra.items() if k != "data"},
    }
    summary = write(out, result, items, rewards, info, tokenizer=model.tokenizer, worst_k=int(b.worst_k))
    print(summary, flush=True)
    return {"metrics": result.flat(), "result": result, "info": info, "rewards": rewards, "items": items}
