"""The benchmark's accounting (never its timings): tokens processed, unique tokens, useful fraction."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmlab.bench.sides import StepClock, run_rmlab, share_per_comparison
from rmlab.bench.workloads import describe, trl_pairs, unique_tokens
from rmlab.data.simulator import SimulatorConfig, generate
from rmlab.data.tokenize import TokenizedGroup, tokenize_groups
from rmlab.data.types import DataReport
from rmlab.models import build_model
from tests.conftest import SHARED_DATA, TINY_LLAMA, needs_shared_data


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
@pytest.mark.parametrize("pair_batching", ["grouped", "shuffled"])
def test_rmlab_side_counts_every_token_once(tmp_path, pair_batching):
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
        max_tokens=100_000,
        max_responses=64,
        seed=0,
        lr=1e-5,
        row_tokens=100_000,
        pair_batching=pair_batching,  # shuffled = the pairs_expanded ablation
    )
    n_cmp = sum(len(g.winner) for g in groups)
    res = run_rmlab(spec)  # max_tokens holds every group: one step is the whole epoch
    assert res["forward_mode"] == "prefix_shared" and res["pair_batching"] == pair_batching
    assert res["comparisons_per_step"] == n_cmp
    # Unique tokens keep the workload's meaning either way: each prompt and response once.
    assert res["unique_tokens_per_comparison"] == pytest.approx(unique_tokens(groups) / n_cmp)
    if pair_batching == "grouped":
        # row_tokens holds the whole batch in one row: no padding, no prompt copies, every token once.
        assert res["useful_token_fraction"] == pytest.approx(1.0)
        # Counted independently: each prompt once plus each response once (no padding, no copies).
        by_hand = sum(len(g.prompt_ids) + sum(len(r) for r in g.response_ids) for g in groups) / n_cmp
    else:
        # One sample per comparison: its prompt once (still shared by its two rows) and both responses,
        # so each response is forwarded once per comparison it is in (twice at K = 3).
        by_hand = (
            sum(
                len(g.prompt_ids) + len(g.response_ids[w]) + len(g.response_ids[lo])
                for g in groups
                for w, lo in zip(g.winner, g.loser)
            )
            / n_cmp
        )
        assert res["useful_token_fraction"] == pytest.approx(unique_tokens(groups) / n_cmp / by_hand)
        assert res["useful_token_fraction"] < 0.9
    assert res["processed_tokens_per_comparison"] == pytest.approx(by_hand)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_a_side_reports_its_own_peak_rss_not_the_benchmarks():
    """The benchmark spawns each side (vfork + exec), and Linux keeps ``ru_maxrss`` across exec: with it, every
    side reported at least the spawning process's peak (2.6 GB on the GPU run of 2026-11-26, for both TRL and
    rmlab). ``peak_rss_mb`` is the side's own high-water mark."""
    big = torch.ones(400 * 2**20 // 4)  # 400 MB written: this process's peak is at least that
    del big
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    code = "import resource; from rmlab.bench.sides import peak_rss_mb; " \
        "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    own, inherited = map(float, out.split())
    assert inherited >= parent_peak - 1  # what ru_maxrss says in the child: the parent's peak
    assert 0 < own < parent_peak - 300  # the child itself: the interpreter, torch and rmlab.bench imported


def _row(side, cps, processed, unique, rss, mode=""):
    return dict(
        model="m",
        workload="w",
        side=side,
        mode=mode,
        comparisons_per_s=cps,
        comparisons_per_s_aggregate=cps / 2,
        processed_tokens_per_comparison=processed,
        unique_tokens_per_comparison=unique,
        useful_token_fraction=unique / processed,
        peak_rss_mb=rss,
    )


def test_ratios_against_trl_in_json_and_markdown(tmp_path):
    from rmlab.bench.cli import RATIOS, add_ratios, markdown, render

    trl = _row("trl", 4.0, 600.0, 150.0, 1000.0)
    ours = _row("rmlab", 10.0, 200.0, 160.0, 800.0, mode="prefix_shared")
    no_sort = {**_row("rmlab", 5.0, 300.0, 150.0, 900.0, mode="padded"), "ablation": "no_sort"}
    runs = [trl, ours, no_sort, {"side": "rmlab", "mode": "packed", "model": "m", "workload": "w", "error": "boom"}]
    add_ratios(runs, None, {"m": {"non_embedding_params": 1}})
    assert "vs_trl" not in trl and set(ours["vs_trl"]) == set(RATIOS)
    v = ours["vs_trl"]
    # 10 / 4; 200 / 600; 160 / 150; (160 / 200) / (150 / 600) = 0.8 / 0.25; 800 / 1000
    assert v["comparisons_per_s"] == pytest.approx(2.5) and v["comparisons_per_s_aggregate"] == pytest.approx(2.5)
    assert v["processed_tokens_per_comparison"] == pytest.approx(1 / 3)
    assert v["unique_tokens_per_comparison"] == pytest.approx(16 / 15)
    assert v["useful_token_fraction"] == pytest.approx(3.2)
    assert v["peak_rss_mb"] == pytest.approx(0.8)
    meta = dict(
        command="c",
        date="d",
        machine="x",
        torch="t",
        transformers="tf",
        trl="r",
        threads=1,
        precision="fp32",
        seconds=1,
        warmup=0,
        peak_tflops=None,
    )
    lines = markdown({"meta": meta, "runs": runs}).splitlines()
    head = [c.strip() for c in lines[3].strip("|").split("|")]
    assert head[-5:] == ["speed vs TRL", "processed vs TRL", "unique vs TRL", "useful vs TRL", "RSS vs TRL"]
    assert lines[5].endswith("| 1.00x | 1.00 | 1.00 | 1.00 | 1.00 |")  # TRL is its own baseline
    assert lines[6].endswith("| 2.50x | 0.33 | 1.07 | 3.20 | 0.80 |")
    assert "| rmlab padded, no_sort |" in lines[7] and lines[7].endswith("| 1.25x | 0.50 | 1.00 | 2.00 | 0.90 |")
    assert all(line.count("|") == len(head) + 1 for line in lines[3:])  # error rows keep the column count
    # --render: the same table from a recorded JSON, without running anything
    for r in runs:
        r.pop("vs_trl", None)
    (tmp_path / "b.json").write_text(
        json.dumps({"meta": meta, "models": {"m": {"non_embedding_params": 1}}, "runs": runs})
    )
    assert render(tmp_path / "b.json").splitlines() == lines == (tmp_path / "b.md").read_text().splitlines()
    assert json.loads((tmp_path / "b.json").read_text())["runs"][1]["vs_trl"] == v


def test_pairs_expanded_repeats_responses_but_keeps_unique_tokens():
    from rmlab.bench.sides import expand_pairs

    g1 = _group([1, 2, 3, 4], [[5, 6], [7], [8, 9, 10]], [(0, 1), (0, 2), (2, 1)])  # 10 unique tokens, 3 comparisons
    g2 = _group([1], [[2, 3], [4]], [(1, 0)])  # 4 unique, 1 comparison
    samples, share = expand_pairs([g1, g2])
    assert [s.k for s in samples] == [2, 2, 2, 2] and all(s.winner == [0] and s.loser == [1] for s in samples)
    assert samples[2].response_ids == [[8, 9, 10], [7]] and samples[3].response_ids == [[4], [2, 3]]
    assert share == {"0": 10 / 3, "1": 4.0}
    assert [s.group_id.rsplit("/c", 1)[0] for s in samples] == ["0", "0", "0", "1"]
    # Every response is forwarded once per comparison it is in: 2 x 4 responses instead of 5.
    assert sum(s.k for s in samples) == 8 and sum(share[s.group_id.rsplit("/c", 1)[0]] for s in samples) == 14


@needs_shared_data
@pytest.mark.slow
def test_smoke_preset_runs_the_gpu_code_on_cpu(tmp_path):
    """``--preset smoke``: the GPU preset's code path (batch-size search, measured matmul peak, MFU, JSON and
    markdown) at CI size on CPU, TRL against rmlab on HH and AlpacaEval, every row filled."""
    from rmlab.bench.cli import PRESETS, main

    out, work = tmp_path / "new" / "out", tmp_path / "elsewhere"  # --out a new folder, --work elsewhere
    res = main(["--preset", "smoke", "--out", str(out), "--work", str(work), "--data-dir", str(SHARED_DATA)])
    assert (out / "bench.json").exists() and (out / "bench.md").exists()
    meta, runs = res["meta"], res["runs"]
    assert meta["preset"] == "smoke" and meta["peak_measured"] and meta["peak_tflops"] > 0
    assert [(r["workload"], r["side"]) for r in runs] == [("hh", "trl"), ("hh", "rmlab"), ("alpaca", "trl"), ("alpaca", "rmlab")]
    assert not [r for r in runs if "error" in r]
    sizes = {"trl": PRESETS["smoke"]["trl_sizes"], "rmlab": PRESETS["smoke"]["rmlab_sizes"]}
    for r in runs:
        key = "batch_size" if r["side"] == "trl" else "max_tokens"
        tried = [t[key] for t in r["search"]]
        assert tried == [int(x) for x in sizes[r["side"]].split(",")]  # every size ran (no cap on CPU)
        best = max(r["search"], key=lambda t: t["comparisons_per_s"])
        assert r["batch"] == f"{key}={best[key]}" and r["comparisons_per_s"] == best["comparisons_per_s"]
        assert 0 < r["mfu"] < 1 and r["compiled_graphs"] == 0
        # Host memory per phase, for each size searched: the run's peak is the largest phase peak.
        built = "data and module built" if r["side"] == "rmlab" else "data and trainer built"
        names = [p["phase"] for p in r["rss_phases"]]
        assert names[0] == "imports" and names.count(built) == names.count("last step") == len(tried)
        assert r["peak_rss_mb"] == pytest.approx(max(p["peak_mb"] for p in r["rss_phases"]), abs=64)
        if r["side"] == "rmlab":
            assert r["useful_token_fraction"] == pytest.approx(1.0)  # prefix sharing, one packed row
            assert r["vs_trl"]["processed_tokens_per_comparison"] < 0.6
    # MFU counts unique tokens (6N each) plus causal attention pairs (12 x layers x hidden each)
    m, w = res["models"]["llama-tiny"], res["workloads"]["hh"]
    r = runs[1]
    flops = r["comparisons_per_s"] * (6 * m["non_embedding_params"] * r["unique_tokens_per_comparison"]
                                      + 12 * m["layers"] * m["hidden"] * w["attention_pairs_per_comparison"])
    assert r["mfu"] == pytest.approx(flops / (meta["peak_tflops"] * 1e12))
    md = (out / "bench.md").read_text()
    assert "| MFU | batch |" in md and "Matmul peak" in md


@pytest.mark.slow
def test_compile_rows_report_their_compiled_graphs(tmp_path):
    """``--compile``: rmlab's sides train with ``model.compile=true`` (TRL's as it is) and the table shows the graphs
    each side compiled, so a run that recompiles at every step shows it (the bench reported 0 for every row: it had
    no way to compile)."""
    from rmlab.bench.cli import main

    out = tmp_path / "out"
    res = main(["--preset", "smoke", "--workloads", "hh", "--trl-sizes", "2", "--rmlab-sizes", "1024", "--compile",
                "--out", str(out), "--data-dir", str(SHARED_DATA)])
    assert res["meta"]["compile"] is True
    trl, rmlab = res["runs"]
    assert "error" not in rmlab, rmlab.get("error")
    assert trl["compiled_graphs"] == 0 and rmlab["compiled_graphs"] > 0  # (that they stop: tests/test_packing.py)
    md = (out / "bench.md").read_text()
    assert "| compiled graphs |" in md and "rmlab prefix_shared, compiled" in md
    row = next(line for line in md.splitlines() if "rmlab prefix_shared, compiled" in line)
    assert f"| {rmlab['compiled_graphs']} |" in row


def test_liger_rows_run_the_plain_rows_winning_budget_and_are_labelled():
    """``--liger`` (opt-in, also with ``--preset gpu``): one more rmlab row per mode with model.liger=true, at the budget the
    plain row of that mode won (one size, not the search again), labelled ``, liger`` in the table."""
    from rmlab.bench.cli import PRESETS, markdown, parse, with_liger

    spec = dict(side="rmlab", mode="prefix_shared", sizes=[16384, 32768, 65536], max_tokens=4096)
    assert with_liger(spec, {"max_tokens": 32768, "comparisons_per_s": 9.0}) == {**spec, "liger": True, "sizes": [32768]}
    assert with_liger(spec, {"error": "out of memory"})["sizes"] == spec["sizes"]  # nothing won: search as usual
    assert with_liger(dict(spec, sizes=[]), None) == {**spec, "sizes": [], "liger": True}  # no search (CPU runs)
    assert not parse(["--preset", "gpu"]).liger and not parse(["--preset", "smoke"]).liger and not parse([]).liger
    assert parse(["--preset", "gpu", "--liger"]).liger and PRESETS["gpu"]["liger"] is False
    meta = dict(command="c", date="d", machine="x", torch="t", transformers="tf", trl="r", threads=1,
                precision="bf16 mixed", seconds=1, warmup=0, peak_tflops=None)
    trl = _row("trl", 4.0, 600.0, 150.0, 1000.0)
    plain = {**_row("rmlab", 10.0, 200.0, 160.0, 800.0, mode="prefix_shared"), "liger": []}
    fused = {**_row("rmlab", 12.0, 200.0, 160.0, 800.0, mode="prefix_shared"), "liger": ["rms_norm", "rope", "swiglu"]}
    failed = {"side": "rmlab", "mode": "prefix_shared", "model": "m", "workload": "w", "liger_requested": True,
              "error": "ImportError: model.liger=true needs the liger-kernel package"}
    lines = markdown({"meta": meta, "runs": [trl, plain, fused, failed]}).splitlines()
    assert "| rmlab prefix_shared |" in lines[6] and "liger" not in lines[6]
    assert "| rmlab prefix_shared, liger | 12.0 |" in lines[7]
    assert "| rmlab prefix_shared, liger | error: ImportError: model.liger=true needs the liger-kernel" in lines[8]
