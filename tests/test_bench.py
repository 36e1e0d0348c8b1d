"""The benchmark's accounting (never its timings): tokens processed, unique tokens, useful fraction."""

from __future__ import annotations

import json

import pytest
import torch

from rmlab.bench.sides import StepClock, run_rmlab, share_per_comparison
from rmlab.bench.workloads import describe, trl_pairs, unique_tokens
from rmlab.data.simulator import SimulatorConfig, generate
from rmlab.data.tokenize import TokenizedGroup, tokenize_groups
from rmlab.data.types import DataReport
from rmlab.model import build_model
from tests.conftest import TINY_LLAMA


def _group(prompt, responses, comps):
    n = len(comps)
    return TokenizedGroup(
        prompt_ids=prompt,
        response_ids=responses,
        winner=[w for w, _ in comps],
        loser=[lo for _, lo in comps],
        margin=[float("nan")] * n,
        strength=[-1] * n,
        weight=[1.0] * n,
        tie=[False] * n,
        group_weight=[1.0 / n] * n,
    )


def test_workload_accounting_by_hand():
    g1 = _group([1, 2, 3, 4], [[5, 6], [7], [8, 9, 10]], [(0, 1), (0, 2), (2, 1)])  # 4 + 6 unique tokens
    g2 = _group([1], [[2, 3], [4]], [(1, 0)])  # 1 + 3
    assert unique_tokens([g1, g2]) == 14
    assert describe([g1, g2])["unique_tokens_per_comparison"] == 14 / 4
    pairs = trl_pairs([g1, g2])
    assert pairs[0] == {"chosen_ids": [1, 2, 3, 4, 5, 6], "rejected_ids": [1, 2, 3, 4, 7]}
    assert pairs[3] == {"chosen_ids": [1, 4], "rejected_ids": [1, 2, 3]}
    shares = share_per_comparison([g1, g2])
    assert shares[((1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 7))] == 10 / 3 and shares[((1, 4), (1, 2, 3))] == 4.0
    # TRL pads 2 x batch rows to the longest: the first two comparisons of g1 process 4 x 7 = 28 tokens
    # for 20/3 unique ones.
    rows = [p["chosen_ids"] for p in pairs[:2]] + [p["rejected_ids"] for p in pairs[:2]]
    processed = len(rows) * max(map(len, rows))
    assert processed == 28 and sum(list(shares.values())[:2]) / processed == pytest.approx(20 / 3 / 28)


def test_step_clock_summary():
    clock = StepClock(seconds=0, warmup=1)
    clock.steps = [
        {"seconds": 9.0, "comparisons": 1, "unique": 1, "processed": 1},  # warm-up: left out
        {"seconds": 1.0, "comparisons": 4, "unique": 300, "processed": 400},
        {"seconds": 2.0, "comparisons": 4, "unique": 100, "processed": 200},
        {"seconds": 1.0, "comparisons": 2, "unique": 100, "processed": 100},
    ]
    s = clock.summary()
    assert s["steps_measured"] == 3
    assert s["comparisons_per_s"] == 2.0  # median of 4, 2, 2
    assert s["comparisons_per_s_aggregate"] == 10 / 4
    assert s["processed_tokens_per_comparison"] == 70.0 and s["unique_tokens_per_comparison"] == 50.0
    assert s["useful_token_fraction"] == 500 / 700


@pytest.mark.slow
def test_rmlab_side_counts_every_token_once(tmp_path):
    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5")
    model.save_pretrained(tmp_path / "model")
    groups = tokenize_groups(
        generate(SimulatorConfig(num_prompts=6, k=3, tie_band=0.0, seed=1)),
        model.tokenizer,
        DataReport(),
        max_length=256,
        min_prompt_tokens=8,
    )
    (tmp_path / "w.json").write_text(json.dumps([g.to_dict() for g in groups]))
    spec = dict(
        model_dir=str(tmp_path / "model"),
        workload=str(tmp_path / "w.json"),
        mode="prefix_shared",
        device="cpu",
        seconds=1e9,
        warmup=0,
        max_steps=2,
        max_tokens=10_000,
        max_responses=64,
        seed=0,
        lr=1e-5,
        row_tokens=10_000,
    )
    n_cmp = sum(len(g.winner) for g in groups)
    res = run_rmlab(spec)  # max_tokens holds every group: one step is the whole epoch
    assert res["forward_mode"] == "prefix_shared"
    assert res["comparisons_per_step"] == n_cmp
    assert res["unique_tokens_per_comparison"] == pytest.approx(unique_tokens(groups) / n_cmp)
    # row_tokens holds the whole batch in one row: no padding, no prompt copies, every token once.
    assert res["useful_token_fraction"] == pytest.approx(1.0)
    # Counted independently: each prompt once plus each response once (no padding, no copies).
    by_hand = sum(len(g.prompt_ids) + sum(len(r) for r in g.response_ids) for g in groups) / n_cmp
    assert res["processed_tokens_per_comparison"] == pytest.approx(by_hand)
