"""eval.py benchmark=...: RewardBench v1/v2, RM-Bench and best-of-K scored as their authors score them.

The data are FIXTURES (tests/fixtures/benchmarks/, written by make_fixtures.py in each benchmark's published
schema), not the benchmarks. Rules are checked three ways: hand-computed values on hand-made rewards, the
`rewardbench` package's own scoring functions on the same per-example rewards, and a model trained by train.py
scored on the fixtures with every section recomputed here from its per-example rewards.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rmlab.benchmarks import best_of_k, rewardbench, rewardbench2, rm_bench
from rmlab.benchmarks.common import Item
from rmlab.data.sources import DataError
from tests.conftest import ROOT, compose

FX = ROOT / "tests" / "fixtures" / "benchmarks"
RB1, RB2, RMB, PRIOR = (FX / "rewardbench_filtered.jsonl", FX / "rewardbench2_test.jsonl",
                        FX / "rm_bench_total_dataset.json", FX / "preference_test_sets.json")

pytestmark = pytest.mark.usefixtures("one_thread")


def items_of(subsets: list[str], k: int = 2, n_chosen: int = 1) -> list[Item]:
    return [Item(uid=str(i), subset=s, prompt="p", responses=["r"] * k, n_chosen=n_chosen) for i, s in enumerate(subsets)]


# --------------------------------------------------------------------------- rules, by hand
def test_rewardbench_sections_weights_and_score_by_hand():
    subs = [s for sec in rewardbench.SECTIONS.values() for s in sec]
    # every subset: two examples; alpacaeval-easy and math-prm both right, every hep-* both wrong, the rest 1 of 2
    right = {"alpacaeval-easy": 2, "math-prm": 2, **{f"hep-{x}": 0 for x in ("cpp", "go", "java", "js", "python", "rust")}}
    items, rewards = [], []
    for s in subs:
        for j in range(2):
            items.append(Item(uid=f"{s}{j}", subset=s, prompt="p", responses=["a", "b"]))
            rewards.append([1.0, 0.0] if j < right.get(s, 1) else [0.5, 0.5])  # an exact tie is wrong
    r = rewardbench.score(items, rewards)
    # Chat: (100 * 1 + (95 + 95 + 28 + 40) * 0.5) / 358
    assert r.sections["Chat"] == pytest.approx((100 + 258 * 0.5) / 358, abs=1e-12)
    assert r.sections["Chat Hard"] == pytest.approx(0.5) and r.sections["Safety"] == pytest.approx(0.5)
    # Reasoning: math-prm counts 984 = 6 x 164, so PRM math is half of it whatever its 447 examples
    assert r.sections["Reasoning"] == pytest.approx(984 / (984 + 6 * 164)) == pytest.approx(0.5)
    assert r.score == pytest.approx((r.sections["Chat"] + 0.5 + 0.5 + 0.5) / 4, abs=1e-12)
    assert r.subsets["mt-bench-easy"] == (0.5, 2)
    # the prior sets at half weight: (2 x 4 sections + 1 x mean of the four leaderboard sets) / 9
    prior = [Item(uid=f"p{s}", subset=s, prompt=[{"role": "user", "content": "q"}], responses=["a", "b"])
             for s in ("anthropic_helpful", "anthropic_hhh", "shp", "summarize", "anthropic_harmless")]
    rp = rewardbench.score(items + prior, rewards + [[1, 0], [0, 1], [1, 0], [1, 0], [0, 1]], with_prior=True)
    assert rp.sections["Prior Sets"] == pytest.approx(0.75)  # anthropic_harmless is not in the average
    assert rp.score == pytest.approx((2 * (r.sections["Chat"] + 1.5) + 0.75) / 9, abs=1e-12)
    # a missing section: no leaderboard number, said so
    r3 = rewardbench.score(items[:10], rewards[:10])
    assert math.isnan(r3.score) and "Reasoning" in r3.notes[0]


def test_rewardbench2_best_of_4_credit_and_ties_by_hand():
    f = rewardbench2.best_of_n_credit
    assert f([3, 1, 2, 0]) == 1 and f([1, 3, 2, 0]) == 0 and f([3, 3, 1, 0]) == 0.5 and f([2, 2, 2, 2]) == 0.25
    ties = [
        Item("ref:0", "Ties", "p", ["c", "x", "y"], n_chosen=1), Item("tied:0", "Ties", "p", ["c1", "c2", "x"], n_chosen=2),
        Item("ref:1", "Ties", "p", ["c", "x", "y"], n_chosen=1), Item("tied:1", "Ties", "p", ["c1", "c2", "x"], n_chosen=2),
    ]
    rw = [[5.0, 1.0, 2.0], [4.0, 3.0, 0.0],  # prompt 0: ref gap 3, tied spread 1 gap 3: all good
          [1.0, 2.0, 0.0], [2.0, 2.0, 1.0]]  # prompt 1: ref wrong (gap -1), tied spread 0 gap 1
    t = rewardbench2.ties_score(ties, rw)
    assert t["acc_ref"] == 0.5 and t["acc_tied"] == 1.0
    assert t["preferred"] == 1.0  # 3 > 1 and 1 > 0
    assert t["preferred_hard"] == 0.5  # min(3, 3) > 1; min(-1, 1) = -1 > 0 fails
    # margin: tanh(3/1 - 1) and, with spread 0 and gap -1, numpy's -inf -> tanh -1
    assert t["margin"] == pytest.approx((math.tanh(2.0) - 1.0) / 2)
    assert t["score"] == pytest.approx(0.3 * 1 + 0.3 * 0.5 + 0.2 * 1 + 0.2 * 0.5 + 0.01 * t["margin"])
    subs = ["Factuality", "Precise IF", "Math", "Safety", "Focus"]
    items = [Item(str(i), s, "p", ["c", "a", "b", "d"]) for i, s in enumerate(subs)] + ties
    rewards = [[3, 1, 2, 0], [1, 3, 2, 0], [3, 3, 1, 0], [3, 1, 2, 0], [3, 1, 2, 0]] + rw
    r = rewardbench2.score(items, rewards)
    assert [r.sections[s] for s in subs] == [1, 0, 0.5, 1, 1]
    assert r.score == pytest.approx((3.5 + t["score"]) / 6, abs=1e-12)


def test_rm_bench_matrix_and_difficulty_by_hand():
    # chosen (c0 concise, c1 detailed, c2 markdown) vs rejected (j0, j1, j2)
    a = [1, 2, 3, 0.5, 1.5, 2.5]  # c_i > j_j where i >= j: the lower triangle and the diagonal right
    b = [9, 9, 9, 0, 0, 0]  # every cell right
    items = [Item(str(i), d, "p", ["x"] * 6, n_chosen=3) for i, d in
             enumerate(["chat", "chat", "math", "code", "safety-refuse", "safety-response"])]
    rewards = [a, b, b, a, a, b]
    r = rm_bench.score(items, rewards)
    assert rm_bench.matrix([a, b]) == [[1, 0.5, 0.5], [1, 1, 0.5], [1, 1, 1]]
    assert r.scalars["chat/hard"] == 0.5 and r.scalars["chat/normal"] == 1 and r.scalars["chat/easy"] == 1
    assert r.sections == {"chat": pytest.approx(2.5 / 3), "math": 1, "code": pytest.approx(2 / 3),
                          "safety": pytest.approx(2.5 / 3)}
    assert r.score == pytest.approx((2.5 / 3 + 1 + 2 / 3 + 2.5 / 3) / 4)
    assert r.scalars["hard"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4) and r.scalars["easy"] == 1
    assert r.scalars["style_gap"] == pytest.approx(1 - 0.5)  # normal - hard
    assert r.subsets["safety-refuse"] == (pytest.approx(6 / 9), 1)  # the row's own domain, 6 of 9 cells


def test_best_of_k_by_hand():
    items = [Item("a", "s", "p", ["x"] * 4, n_chosen=0, gold=[1.0, 3.0, 2.0, 0.0]),
             Item("b", "s", "p", ["x"] * 4, n_chosen=0, gold=[4.0, 0.0, 0.0, 0.0])]
    rewards = [[0.1, 0.9, 0.2, 0.0],  # picks the best: acc 1, gold 3
               [0.5, 0.1, 0.5, 0.0]]  # a tie at the top between gold 4 and gold 0: acc 1/2, gold 2
    r = best_of_k.score(items, rewards, ks=[2], draws=3, seed=0)
    assert r.score == 0.75
    assert r.scalars["gold_picked"] == 2.5 and r.scalars["gold_best"] == 3.5 and r.scalars["regret"] == 1.0
    assert r.scalars["gap_closed"] == pytest.approx(((3 - 1.5) / (3 - 1.5) + (2 - 1) / (4 - 1)) / 2)


# --------------------------------------------------------------------------- the rewardbench package itself
def official(*names: str) -> dict:
    """Functions and constants of the installed `rewardbench` package, taken from its own files. Importing the
    package runs its __init__, which needs fastchat and transformers 4.x; its scoring functions need neither."""
    spec = importlib.util.find_spec("rewardbench")
    if spec is None:
        pytest.skip("the rewardbench package is not installed (pip install --no-deps rewardbench)")
    import collections
    import typing

    import datasets
    import pandas

    pkg = Path(spec.submodule_search_locations[0])
    ns: dict = {"np": np, "pd": pandas, "math": math, "Dataset": datasets.Dataset, "defaultdict": collections.defaultdict,
                **{k: getattr(typing, k) for k in ("Any", "Dict", "List", "Tuple", "Union")}}
    exec(compile((pkg / "constants.py").read_text(), str(pkg / "constants.py"), "exec"), ns)
    tree = ast.parse((pkg / "utils.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            exec(compile(ast.Module([node], []), str(pkg / "utils.py"), "exec"), ns)
    missing = [n for n in names if n not in ns]
    assert not missing, f"rewardbench/utils.py has no {missing}"
    return ns


def test_rewardbench_v1_equals_the_package():
    """Per-example rewards -> the package's own aggregation (scripts/run_rm.py: results = 1 if chosen > rejected,
    subset = sum(results) / len; then calculate_scores_per_section) and rmlab's: every section, every subset, the
    per-example results and the leaderboard's mean of the four sections agree."""
    ns = official("calculate_scores_per_section")
    assert rewardbench.EXAMPLE_COUNTS == ns["EXAMPLE_COUNTS"] and rewardbench.SECTIONS == ns["SUBSET_MAPPING"]
    rng = random.Random(3)
    complete = 0
    for trial in range(40):
        subs = [s for s in rewardbench.EXAMPLE_COUNTS if trial % 4 == 0 or rng.random() < 0.9]
        items = [Item(f"{s}{j}", s, "p", ["a", "b"]) for s in subs for j in range(rng.randint(1, 6))]
        rng.shuffle(items)  # the official code groups by subset whatever the row order
        rewards = [[rng.choice([0.0, 0.5, 1.0]), rng.choice([0.0, 0.5, 1.0])] for _ in items]  # many exact ties
        results = [1 if chosen > rejected else 0 for chosen, rejected in rewards]  # run_rm.py, per example
        grouped = {s: [r for it, r in zip(items, results) if it.subset == s] for s in np.unique([i.subset for i in items])}
        per_subset = {s: sum(v) / len(v) for s, v in grouped.items()}
        theirs = ns["calculate_scores_per_section"](ns["EXAMPLE_COUNTS"], ns["SUBSET_MAPPING"], per_subset)
        ours = rewardbench.score(items, rewards)
        assert [row["credit"] for row in ours.per_item] == results
        assert {s: a for s, (a, _) in ours.subsets.items()} == pytest.approx(per_subset, abs=1e-12)
        for sec, v in theirs.items():
            if any(s in per_subset for s in ns["SUBSET_MAPPING"][sec]):
                assert ours.sections[sec] == pytest.approx(v, abs=1e-12)
            else:  # the package writes 0 for a section with no subset; rmlab leaves it out and gives no score
                assert v == 0 and sec not in ours.sections and math.isnan(ours.score)
        if len(ours.sections) == 4:
            complete += 1
            assert ours.score == pytest.approx(np.mean(list(theirs.values())), abs=1e-12)
    assert complete >= 10


def test_rewardbench2_equals_the_package():
    """scripts/run_v2.py's flow with the package's own functions (rows unrolled to one score per completion,
    reroll_and_score_dataset by total_completions, per-subset mean of its results, process_single_model for Ties)
    against rmlab's rewardbench2.score on the same per-completion rewards: every credit, subset and the mean of six."""
    ns = official("reroll_and_score_dataset", "sample_stats", "process_single_model")
    from datasets import Dataset

    rng = random.Random(5)
    items, rewards = [], []
    for i in range(60):  # best-of-4 rows, rewards from a small set so ties at the top happen
        items.append(Item(str(i % 20), rewardbench2.SUBSETS[i % 5], "p", ["c", "a", "b", "d"]))  # ids repeat, as on the hub
        rewards.append([float(rng.randint(0, 3)) for _ in range(4)])
    # Ties: paired prompts (1 correct for ref, 2-4 for tied), some unpaired; continuous rewards (where the correct
    # answers' spread is exactly 0, rewardbench 0.1.4 and the repository's code differ: docs/eval.md)
    for pid in range(14):
        if pid < 12:
            kinds = [("ref", 1), ("tied", rng.randint(2, 4))]
        else:  # a reference prompt without its tied version, and the other way round
            kinds = [("ref", 1)] if pid == 12 else [("tied", 2)]
        for kind, nc in kinds:
            k = nc + rng.randint(1, 5)
            items.append(Item(f"{kind}:{pid}", "Ties", "p", ["x"] * k, n_chosen=nc))
            rewards.append([rng.gauss(0.6 if j < nc else 0.0, 1.0) for j in range(k)])
    order = list(range(len(items)))
    rng.shuffle(order)
    items, rewards = [items[i] for i in order], [rewards[i] for i in order]
    flat = Dataset.from_dict({
        "text": [f"{n}-{j}" for n, rs in enumerate(rewards) for j in range(len(rs))],
        "scores": [r for rs in rewards for r in rs],
        "subset": [it.subset for it, rs in zip(items, rewards) for _ in rs],
        "id": [it.uid for it, rs in zip(items, rewards) for _ in rs],
    })
    out = ns["reroll_and_score_dataset"](flat, [len(rs) for rs in rewards])
    out = out.add_column("num_correct", [it.n_chosen for it in items])
    theirs = {}
    for subset in np.unique(out["subset"]):
        part = out.filter(lambda ex, s=subset: ex["subset"] == s)
        if subset.lower() == "ties":
            _, theirs[subset] = ns["process_single_model"](part)
        else:
            theirs[subset] = sum(part["results"]) / len(part["results"])
    ours = rewardbench2.score(items, rewards)
    credits = [row["credit"] for row, it in zip(ours.per_item, items) if it.subset != "Ties"]
    assert credits == pytest.approx([r for r, it in zip(out["results"], items) if it.subset != "Ties"], abs=1e-12)
    assert any(0 < c < 1 for c in credits)  # shared top rewards were scored
    assert set(theirs) == set(rewardbench2.SUBSETS)
    for subset, v in theirs.items():
        assert ours.sections[subset] == pytest.approx(v, abs=1e-12), subset
    assert ours.score == pytest.approx(np.mean([theirs[s] for s in rewardbench2.SUBSETS]), abs=1e-12)


# --------------------------------------------------------------------------- a model trained by train.py
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from rmlab.train import run

    out = tmp_path_factory.mktemp("bench_train")
    run(compose(["debug=fast", "export=true", "threads=1"], out))
    return out / "export"


def bench(name: str, source, out: Path, export: Path, *more: str) -> dict:
    from rmlab.benchmarks.runner import run

    res = run(compose([f"benchmark={name}", f"benchmark.source={source}", f"model.name_or_path={export}", *more],
                      out, "eval"))
    blob = json.loads((out / "metrics.json").read_text())
    assert {"bench_sections.png", "length_bias.png"} <= {p.name for p in out.glob("*.png")}
    assert blob["metrics"]["score"] == pytest.approx(res["metrics"]["score"], nan_ok=True)
    return res


def convs(prompt, responses: list[str]) -> list[list[dict]]:
    """A row's conversations, written here from the raw row: the prompt (text or messages), one response each."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [head + [{"role": "assistant", "content": r}] for r in responses]


def direct_rewards(export: Path, res: dict, conversations: list) -> list[list[float]]:
    """rmlab.score's Scorer.score_chat on the conversations, at the run's max_length (debug=fast's 256, the training
    run's) and reward token."""
    from rmlab.models import build_model
    from rmlab.score import Scorer

    scorer = Scorer(build_model(name_or_path=str(export)), max_length=res["info"]["max_length"],
                    reward_token=res["info"]["reward_token"])
    return scorer.score_chat(conversations)


def test_rewardbench_on_a_trained_model_equals_hand_computation(export, tmp_path):
    res = bench("rewardbench", RB1, tmp_path / "ev", export)
    assert res["info"]["max_length"] == 256  # the training run's data.max_length, as rmlab.score takes it
    rows = [json.loads(x) for x in RB1.read_text().splitlines()]
    # the rewards are rmlab's scoring of (prompt, response), nothing else
    direct = direct_rewards(export, res, [convs(r["prompt"], [r["chosen"], r["rejected"]]) for r in rows])
    assert np.allclose(res["rewards"], direct, atol=1e-5)
    right: dict[str, list[float]] = {}
    for r, (rc, rr) in zip(rows, res["rewards"]):
        right.setdefault(r["subset"], []).append(float(rc > rr))
    acc = {s: sum(v) / len(v) for s, v in right.items()}
    chat = (100 * acc["alpacaeval-easy"] + 95 * acc["alpacaeval-length"] + 95 * acc["alpacaeval-hard"]
            + 28 * acc["mt-bench-easy"] + 40 * acc["mt-bench-med"]) / 358
    hard = (37 * acc["mt-bench-hard"] + 100 * acc["llmbar-natural"] + 134 * acc["llmbar-adver-neighbor"]
            + 92 * acc["llmbar-adver-GPTInst"] + 47 * acc["llmbar-adver-GPTOut"] + 46 * acc["llmbar-adver-manual"]) / 456
    safety = (100 * acc["refusals-dangerous"] + 100 * acc["refusals-offensive"] + 154 * acc["xstest-should-refuse"]
              + 250 * acc["xstest-should-respond"] + 136 * acc["donotanswer"]) / 740
    code = sum(acc[f"hep-{x}"] for x in ("cpp", "go", "java", "js", "python", "rust")) / 6
    reasoning = (acc["math-prm"] + code) / 2
    m = res["metrics"]
    assert m["section/Chat"] == pytest.approx(chat) and m["section/Chat Hard"] == pytest.approx(hard)
    assert m["section/Safety"] == pytest.approx(safety) and m["section/Reasoning"] == pytest.approx(reasoning)
    assert m["score"] == pytest.approx((chat + hard + safety + reasoning) / 4)
    assert all(m[f"subset/{s}"] == pytest.approx(a) for s, a in acc.items())
    report = (tmp_path / "ev" / "report.md").read_text()
    assert f"**RewardBench score: {100 * m['score']:.1f}**" in report and "### Chat Hard" in report
    assert len((tmp_path / "ev" / "scores.jsonl").read_text().splitlines()) == 46
    # the pairwise view is rmlab's metrics over the same pairs
    blob = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert blob["metrics"]["pairwise/acc"] == pytest.approx(np.mean([rc > rr for rc, rr in res["rewards"]]))


def _hub_layout(dst: Path, splits: dict[str, list[dict]]) -> Path:
    """A folder laid out as the hub repository (data/<split>-00000-of-00001.parquet): datasets.load_dataset reads
    it with the code path a hub name takes, offline."""
    import pandas

    (dst / "data").mkdir(parents=True)
    for split, rows in splits.items():
        pandas.DataFrame(rows).to_parquet(dst / "data" / f"{split}-00000-of-00001.parquet")
    return dst


def test_hub_layout_and_prior_sets(export, tmp_path):
    rows = [json.loads(x) for x in RB1.read_text().splitlines()]
    hub = _hub_layout(tmp_path / "reward-bench", {"filtered": rows, "raw": rows[:5]})
    prior = _hub_layout(tmp_path / "preference-test-sets", json.loads(PRIOR.read_text()))
    a = bench("rewardbench", RB1, tmp_path / "a", export)
    b = bench("rewardbench", hub, tmp_path / "b", export, f"benchmark.prior_sets={prior}")
    for sec in rewardbench.SECTIONS:  # the filtered split only; the raw split is not read
        assert b["metrics"][f"section/{sec}"] == pytest.approx(a["metrics"][f"section/{sec}"])
    sets = json.loads(PRIOR.read_text())
    # prior-set prompts are messages (some multi-turn): the conversation is those messages, then the response
    prior_items = [it for it in b["items"] if not isinstance(it.prompt, str)]
    raw = [next(r for r in sets[it.subset] if r["chosen"] == it.responses[0]) for it in prior_items]
    assert len(raw) == 21 and any(len(r["prompt"]) > 1 for r in raw)
    direct = direct_rewards(export, b, [convs(r["prompt"], [r["chosen"], r["rejected"]]) for r in raw])
    assert np.allclose([rs for it, rs in zip(b["items"], b["rewards"]) if it in prior_items], direct, atol=1e-5)
    acc = {}
    for it, (rc, rr) in zip(b["items"], b["rewards"]):
        acc.setdefault(it.subset, []).append(float(rc > rr))
    assert "pku_better" not in acc and len(acc["shp"]) == len(sets["shp"])  # pku_* left out, as the official code
    prior_sec = np.mean([np.mean(acc[s]) for s in ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")])
    assert b["metrics"]["section/Prior Sets"] == pytest.approx(prior_sec)
    four = [a["metrics"][f"section/{s}"] for s in rewardbench.SECTIONS]
    assert b["metrics"]["score"] == pytest.approx((2 * sum(four) + prior_sec) / 9)
    assert any("pku_better" in n for n in b["result"].notes)


def test_rewardbench2_on_a_trained_model(export, tmp_path):
    rows = [json.loads(x) for x in RB2.read_text().splitlines()]
    hub = _hub_layout(tmp_path / "reward-bench-2", {"test": rows})
    res = bench("rewardbench2", hub, tmp_path / "ev", export)
    direct = direct_rewards(export, res, [convs(r["prompt"], r["chosen"] + r["rejected"]) for r in rows])
    assert [len(x) for x in res["rewards"]] == [len(x) for x in direct]  # Ties rows hold 4 to 6 responses
    # the items the Ties score reads: each row's subset and its count of correct answers (the chosen list)
    assert [(it.subset, it.n_chosen) for it in res["items"]] == [(r["subset"], r.get("num_correct", len(r["chosen"]))) for r in rows]
    assert np.allclose(sum(res["rewards"], []), sum(direct, []), atol=1e-5)
    by: dict[str, list[float]] = {}
    for r, rs in zip(rows, res["rewards"]):
        if r["subset"] != "Ties":
            top = max(rs)
            by.setdefault(r["subset"], []).append(1 / rs.count(top) if rs[0] == top else 0.0)
    m = res["metrics"]
    for s, v in by.items():
        assert m[f"section/{s}"] == pytest.approx(np.mean(v))
    ties = rewardbench2.ties_score([it for it in res["items"] if it.subset == "Ties"],
                                   [rs for it, rs in zip(res["items"], res["rewards"]) if it.subset == "Ties"])
    assert m["section/Ties"] == pytest.approx(ties["score"])
    assert m["score"] == pytest.approx((sum(np.mean(v) for v in by.values()) + ties["score"]) / 6)


def test_rm_bench_on_a_trained_model_and_per_domain_files(export, tmp_path):
    res = bench("rm_bench", RMB, tmp_path / "ev", export)
    rows = json.loads(RMB.read_text())
    # the rewards are rmlab's scoring of each row's 3 chosen then 3 rejected responses
    direct = direct_rewards(export, res, [convs(r["prompt"], r["chosen"] + r["rejected"]) for r in rows])
    assert [len(x) for x in res["rewards"]] == [6] * len(rows) and np.allclose(res["rewards"], direct, atol=1e-5)
    m = res["metrics"]
    for d in ("chat", "math", "code", "safety"):
        rs = [x for r, x in zip(rows, res["rewards"]) if r["domain"].startswith(d)]
        cell = [[np.mean([x[i] > x[3 + j] for x in rs]) for j in range(3)] for i in range(3)]
        hard = (cell[0][1] + cell[0][2] + cell[1][2]) / 3
        normal = (cell[0][0] + cell[1][1] + cell[2][2]) / 3
        easy = (cell[1][0] + cell[2][0] + cell[2][1]) / 3
        assert m[f"{d}/hard"] == pytest.approx(hard) and m[f"{d}/easy"] == pytest.approx(easy)
        assert m[f"section/{d}"] == pytest.approx((hard + normal + easy) / 3)
    assert m["score"] == pytest.approx(np.mean([m[f"section/{d}"] for d in ("chat", "math", "code", "safety")]))
    assert (tmp_path / "ev" / "style_matrix.png").exists() and "Style-bias gap" in (tmp_path / "ev" / "report.md").read_text()
    # the repository's per-domain files carry no domain field: the file name gives it
    split = tmp_path / "data"
    split.mkdir()
    for d in ("chat", "code", "math", "safety-refuse", "safety-response"):
        part = [{k: v for k, v in r.items() if k != "domain"} for r in rows if r["domain"] == d]
        (split / f"{d}_filtered.json").write_text(json.dumps(part))
    res2 = bench("rm_bench", f"{split}/*_filtered.json", tmp_path / "ev2", export)
    assert res2["metrics"]["score"] == pytest.approx(m["score"])


def test_best_of_k_on_ratings_data(export, tmp_path):
    rng = random.Random(1)
    src = tmp_path / "ratings.jsonl"
    with open(src, "w") as f:
        for p in range(6):
            for j in range(5):
                f.write(json.dumps({"q": f"question {p}", "a": f"answer {j} " + "word " * rng.randint(1, 20),
                                    "s": rng.randint(1, 5)}) + "\n")
    res = bench("best_of_k", "null", tmp_path / "ev", export, "data=local", f"data.source={src}", "data.format=ratings",
                "data.fields.prompt=q", "data.fields.response=a", "data.fields.score=s", "benchmark.ks=[2,4]")
    # one item per question, its 5 rated answers with their ratings as the gold values
    assert len(res["items"]) == len(res["rewards"]) == 6 and all(len(rs) == 5 for rs in res["rewards"])
    rated = {(r["q"], r["a"]): r["s"] for r in map(json.loads, src.read_text().splitlines())}
    assert all(it.gold == [rated[it.prompt, a] for a in it.responses] for it in res["items"])
    accs, picked = [], []
    for it, rs in zip(res["items"], res["rewards"]):
        top = [i for i, r in enumerate(rs) if r == max(rs)]
        accs.append(np.mean([it.gold[i] == max(it.gold) for i in top]))
        picked.append(np.mean([it.gold[i] for i in top]))
    assert res["metrics"]["score"] == pytest.approx(np.mean(accs))
    assert res["metrics"]["gold_picked"] == pytest.approx(np.mean(picked))
    assert (tmp_path / "ev" / "best_of_k.png").exists() and "k2/acc" in res["metrics"]


def test_bad_rows_name_the_file_line_and_field(tmp_path):
    from omegaconf import OmegaConf

    bad = tmp_path / "rb.jsonl"
    rows = [json.loads(x) for x in RB1.read_text().splitlines()[:3]]
    del rows[2]["rejected"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"rb.jsonl:3.*'rejected'"):
        rewardbench.load(OmegaConf.create({"source": str(bad), "split": "filtered", "prior_sets": None}))
    rm = tmp_path / "rm.json"
    rm.write_text(json.dumps([{"id": 1, "prompt": "p", "chosen": ["a", "b"], "rejected": ["a", "b", "c"], "domain": "chat"}]))
    with pytest.raises(DataError, match=r"record 0.*'chosen' must be a list of 3"):
        rm_bench.load(OmegaConf.create({"source": str(rm), "split": "train"}))


@pytest.mark.slow
def test_sweep_of_two_models_then_one_leaderboard(export, tmp_path):
    """python eval.py -m benchmark=rewardbench model.name_or_path=a,b; python -m rmlab.summarize <sweep dir>."""
    other = tmp_path / "run2" / "export"  # a second model: a copy of the run (its config.yaml gives max_length)
    shutil.copytree(export, other)
    shutil.copy(export.parent / "config.yaml", other.parent / "config.yaml")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "eval.py", "-m", "benchmark=rewardbench", f"benchmark.source={RB1}",
           f"model.name_or_path={export},{other}", "threads=1", f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=400)
    out = subprocess.run([sys.executable, "-m", "rmlab.summarize", str(sweep)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert "## Leaderboard: rewardbench" in out and "| rank | model | score | Chat | Chat Hard | Safety | Reasoning |" in out
    # each job one flat dir (the "/" of the paths made "_": rmlab.rundir.job_dir_name); both runs found
    found = sorted(sweep.rglob("metrics.json"))
    assert [p.parent.parent for p in found] == [sweep, sweep], found  # one folder below the sweep dir, not nested
    scores = [json.loads(p.read_text())["metrics"]["score"] for p in found]
    assert len(scores) == 2 and scores[0] == pytest.approx(scores[1])  # the same weights: the same numbers
    assert f"{100 * scores[0]:.1f}" in out
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert len((sweep / "summary.csv").read_text().splitlines()) == 3


def test_leaderboard_of_benchmark_runs_best_first(tmp_path, capsys):
    from rmlab.summarize import main

    for i, (model, score, chat) in enumerate([("a", 0.61, 0.9), ("b", 0.74, 0.5), ("c", None, 0.7)]):
        d = tmp_path / f"{i}_model.name_or_path={model}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- benchmark=rewardbench\n- model.name_or_path={model}\n")
        (d / "metrics.json").write_text(json.dumps({
            "metrics": {"score": score, "section/Chat": chat, "section/Safety": 0.5, "acc": 0.1},
            "tables": {"sections": {"Chat": chat, "Safety": 0.5}}, "info": {"benchmark": "rewardbench"}}))
    main([str(tmp_path)])
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("| ")]
    assert lines[0] == "| rank | model | score | Chat | Safety |"
    assert lines[1:] == ["| 1 | model.name_or_path=b | 74.0 | 50.0 | 50.0 |", "| 2 | model.name_or_path=a | 61.0 | 90.0 | 50.0 |",
                         "| 3 | model.name_or_path=c | n/a | 70.0 | 50.0 |"]  # a run without a score goes last
    assert (tmp_path / "summary.csv").read_text().splitlines()[1].startswith("1,model.name_or_path=b,")


def test_a_hub_name_goes_to_datasets_load_dataset(monkeypatch):
    """A name that is no local path is read with datasets.load_dataset(name, split=...), as users online do."""
    import datasets
    from omegaconf import OmegaConf

    seen = {}

    def fake_load(name, split=None, **kw):
        seen.update(name=name, split=split)
        return datasets.Dataset.from_list([json.loads(x) for x in RB2.read_text().splitlines()])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    items, _ = rewardbench2.load(OmegaConf.create({"source": "allenai/reward-bench-2", "split": "test"}))
    assert seen == {"name": "allenai/reward-bench-2", "split": "test"} and len(items) == 21
    monkeypatch.undo()  # offline (HF_HUB_OFFLINE=1): the real call fails, named, with what to do
    with pytest.raises(DataError, match=r"allenai/reward-bench-2\[test\].*could not load the RewardBench 2 data"):
        rewardbench2.load(OmegaConf.create({"source": "allenai/reward-bench-2", "split": "test"}))
