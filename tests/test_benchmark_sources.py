"""The benchmarks' data as published: hub names, splits, columns and types, read exactly as a hub name is read.

The hub is unreachable here, so each benchmark's hub repository is laid out locally as the hub has it (README.md with
the card's features and configs, data/<split>-*.parquet; RM-Bench's total_dataset.json) and ``datasets.load_dataset``
is pointed at it when rmlab asks for the hub name. Scores are then computed by hand from hand-made rewards. No model:
loading and the rules only (tests/test_benchmarks.py scores the fixtures with a trained model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rmlab.benchmarks import rewardbench, rewardbench2, rm_bench
from rmlab.benchmarks.common import conversations
from rmlab.data.sources import DataError
from tests.conftest import ROOT
from tests.fixtures.benchmarks import hub_cards

FX = ROOT / "tests" / "fixtures" / "benchmarks"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.suffix == ".jsonl" else json.loads(path.read_text())


def bench_cfg(name: str, **over) -> dict:
    """The shipped conf/benchmark/<name>.yaml (its hub name and split are under test), with overrides."""
    cfg = OmegaConf.load(ROOT / "conf" / "benchmark" / f"{name}.yaml")
    return OmegaConf.merge(cfg, over)


@pytest.fixture
def hub(monkeypatch):
    """Route datasets.load_dataset(<hub name>, split=...) to a local folder in the hub's layout (the real
    load_dataset reads it), and record what rmlab asked for."""
    import datasets

    real, folders, asked = datasets.load_dataset, {}, []

    def load(name, split=None, **kw):
        asked.append((name, split))
        if name not in folders:
            raise FileNotFoundError(f"{name} is not laid out locally in this test")
        return real(str(folders[name]), split=split, download_mode="force_redownload", **kw)  # never a stale cache

    monkeypatch.setattr(datasets, "load_dataset", load)
    return folders, asked


# --------------------------------------------------------------------------- the fixtures are the published schema
def test_fixtures_have_the_published_columns():
    for r in rows_of(FX / "rewardbench_filtered.jsonl"):
        assert list(r) == list(hub_cards.RB1_COLUMNS) and isinstance(r["id"], int)
    for r in rows_of(FX / "rewardbench2_test.jsonl"):
        assert list(r) == list(hub_cards.RB2_COLUMNS) and isinstance(r["id"], str)
        assert r["num_correct"] == len(r["chosen"]) and r["num_incorrect"] == len(r["rejected"])
        assert r["total_completions"] == len(r["chosen"]) + len(r["rejected"])
        assert set(r["additional_metadata"]) == set(hub_cards.RB2_COLUMNS["additional_metadata"])
    prior = rows_of(FX / "preference_test_sets.json")
    assert set(prior) <= set(hub_cards.PRIOR_SPLITS)
    for rows in prior.values():
        for r in rows:
            assert list(r) == list(hub_cards.PRIOR_COLUMNS) and isinstance(r["id"], int)
            assert all(set(m) == {"role", "content"} for m in r["prompt"])
    for r in rows_of(FX / "rm_bench_total_dataset.json"):
        assert list(r) == hub_cards.RM_BENCH_FIELDS and len(r["chosen"]) == len(r["rejected"]) == 3


# --------------------------------------------------------------------------- the hub path, then the rules by hand
def test_rewardbench_from_the_hub_layout_filtered_split_and_prior_sets(hub, tmp_path):
    folders, asked = hub
    rows = rows_of(FX / "rewardbench_filtered.jsonl")
    decoy = [{**r, "subset": "alpacaeval-easy", "chosen": "raw split row"} for r in rows[:7]]  # the raw split
    folders["allenai/reward-bench"] = hub_cards.hub_layout(tmp_path / "rb", hub_cards.RB1_COLUMNS,
                                                           {"raw": decoy, "filtered": rows})
    folders["allenai/preference-test-sets"] = hub_cards.hub_layout(tmp_path / "prior", hub_cards.PRIOR_COLUMNS,
                                                                   rows_of(FX / "preference_test_sets.json"))
    items, notes = rewardbench.load(bench_cfg("rewardbench", prior_sets="allenai/preference-test-sets"))
    assert asked == [("allenai/reward-bench", "filtered"), ("allenai/preference-test-sets", None)]
    core = [it for it in items if not it.meta["prior"]]
    assert len(core) == 46 and all(it.responses[0] != "raw split row" for it in core)
    assert {it.uid for it in core} == {str(r["id"]) for r in rows}
    prior = [it for it in items if it.meta["prior"]]
    # the split names the subset (the rows' own 'subset' moves aside), pku_* left out, as the official loader does
    assert sorted({it.subset for it in prior}) == ["anthropic_harmless", "anthropic_helpful", "anthropic_hhh",
                                                   "mtbench_gpt4", "mtbench_human", "shp", "summarize"]
    assert any("pku_better" in n for n in notes) and len(prior) == 21
    # hand-made rewards: the first row of each Chat subset and both hep-go rows are exact ties (wrong), the rest right;
    # in the prior sets only the first anthropic_helpful row is wrong
    first_seen: set[str] = set()
    rewards = []
    for it in items:
        wrong = (it.subset in rewardbench.SECTIONS["Chat"] and it.subset not in first_seen) or it.subset == "hep-go"
        wrong = wrong or (it.subset == "anthropic_helpful" and it.subset not in first_seen)
        first_seen.add(it.subset)
        rewards.append([0.3, 0.3] if wrong else [0.9, 0.1])
    r = rewardbench.score(items, rewards, with_prior=True)
    # Chat: every subset 1/2 -> 0.5; Chat Hard, Safety: 1; Reasoning: (984 x 1 + 164 x (5 x 1 + 0)) / (984 + 6 x 164)
    assert r.sections["Chat"] == pytest.approx(0.5) and r.sections["Chat Hard"] == 1 and r.sections["Safety"] == 1
    assert r.sections["Reasoning"] == pytest.approx(11 / 12)
    assert r.scalars["score_4_sections"] == pytest.approx(41 / 48)  # (0.5 + 1 + 1 + 11/12) / 4
    assert r.sections["Prior Sets"] == pytest.approx(11 / 12)  # mean(2/3, 1, 1, 1) over helpful, hhh, shp, summarize
    assert r.score == pytest.approx(31 / 36)  # (2 x 41/12 + 11/12) / 9


def test_rewardbench2_from_the_hub_layout_with_the_published_columns(hub, tmp_path):
    folders, asked = hub
    rows = rows_of(FX / "rewardbench2_test.jsonl")
    folders["allenai/reward-bench-2"] = hub_cards.hub_layout(tmp_path / "rb2", hub_cards.RB2_COLUMNS, {"test": rows})
    items, _ = rewardbench2.load(bench_cfg("rewardbench2"))
    assert asked == [("allenai/reward-bench-2", "test")] and len(items) == 21
    for it, r in zip(items, rows):  # list columns arrive as lists; chosen first; num_correct says how many are right
        assert it.responses == r["chosen"] + r["rejected"] and it.n_chosen == r["num_correct"] and it.uid == r["id"]
    per_subset = [[3, 0, 1, 2], [3, 3, 0, 0], [0, 3, 1, 2]]  # best-of-4: right (1), tied at the top (1/2), wrong (0)
    ties = {"ref:0": [4, 1, 2, 0], "tied:0": [5, 4, 3, 1, 0, 0],  # gap 2 = spread 2: accurate, not preferred
            "ref:1": [1, 2, 0, 0], "tied:1": [6, 6, 6, 1, 0, 0],  # ref wrong; spread 0: gap 5 > 0, min gap -1 < 0
            "ref:2": [9, 1, 1, 1], "tied:2": [7, 6, 5, 0, 0, 4]}  # spread 2, gap 1
    seen: dict[str, int] = {}
    rewards = []
    for it in items:
        if it.subset == "Ties":
            rewards.append([float(x) for x in ties[it.uid]])
        else:
            rewards.append([float(x) for x in per_subset[seen.get(it.subset, 0)]])
            seen[it.subset] = seen.get(it.subset, 0) + 1
    r = rewardbench2.score(items, rewards)
    assert [r.sections[s] for s in ("Factuality", "Precise IF", "Math", "Safety", "Focus")] == [0.5] * 5
    margin = (math.tanh(2 / 2 - 1) + -1.0 + math.tanh(1 / 2 - 1)) / 3  # tanh(min gap / spread - 1); -1/0 -> -inf -> -1
    assert r.scalars["ties/acc_ref"] == pytest.approx(2 / 3) and r.scalars["ties/acc_tied"] == 1
    assert r.scalars["ties/preferred"] == pytest.approx(1 / 3) and r.scalars["ties/preferred_hard"] == 0
    assert r.scalars["ties/margin"] == pytest.approx(margin)
    ties_score = 0.3 * 1 + 0.3 * 2 / 3 + 0.2 * 1 / 3 + 0.2 * 0 + 0.01 * margin
    assert r.sections["Ties"] == pytest.approx(ties_score)
    assert r.score == pytest.approx((5 * 0.5 + ties_score) / 6)


def test_rm_bench_from_the_hub_layout_pools_the_safety_domains(hub, tmp_path):
    folders, asked = hub
    rows = rows_of(FX / "rm_bench_total_dataset.json")
    refuse = next(r for r in rows if r["domain"] == "safety-refuse")
    rows.append({**refuse, "id": 99})  # two safety-refuse rows, one safety-response: pooled, not averaged
    for r in rows:  # the repository's per-domain files carry more keys, different per domain
        if r["domain"] == "chat":
            r.update(subset="alpacaeval", error=None, error_key=None)
        if r["domain"] == "code":
            r.update(subset="bigcode/humanevalpack", language="python", task_id="Python/0")
    folders["THU-KEG/RM-Bench"] = hub_cards.rm_bench_layout(tmp_path / "rmb", rows)
    items, _ = rm_bench.load(bench_cfg("rm_bench"))
    assert asked == [("THU-KEG/RM-Bench", "train")] and len(items) == 9
    assert [it.subset for it in items] == [r["domain"] for r in rows]
    a = [1, 2, 3, 0.5, 1.5, 2.5]  # chosen style i beats rejected style j when i >= j: hard 0, normal 1, easy 1
    b = [9, 9, 9, 0, 0, 0]  # every cell right
    plan = {"chat": [a, b], "code": [a, a], "math": [b, b], "safety-refuse": [a, a], "safety-response": [b]}
    rewards = [[float(x) for x in plan[it.subset].pop(0)] for it in items]
    r = rm_bench.score(items, rewards)
    # safety: the three rows in one matrix -> hard 1/3 (pooled; the mean of the two subdomains would be 1/2)
    assert r.scalars["safety/hard"] == pytest.approx(1 / 3) and r.sections["safety"] == pytest.approx(7 / 9)
    assert r.sections["chat"] == pytest.approx(2.5 / 3) and r.sections["code"] == pytest.approx(2 / 3)
    assert r.sections["math"] == 1
    assert r.scalars["hard"] == pytest.approx((0.5 + 0 + 1 + 1 / 3) / 4)
    assert r.score == pytest.approx((2.5 / 3 + 2 / 3 + 1 + 7 / 9) / 4)
    # the same folder as a local copy (read as a file, not through datasets) gives the same items
    local, _ = rm_bench.load(bench_cfg("rm_bench", source=str(tmp_path / "rmb")))
    assert [(i.uid, i.subset, i.responses) for i in local] == [(i.uid, i.subset, i.responses) for i in items]


# --------------------------------------------------------------------------- save_to_disk copies
def test_save_to_disk_copies_read_as_the_hub(tmp_path):
    import datasets

    rows = rows_of(FX / "rewardbench_filtered.jsonl")
    dd = datasets.DatasetDict({"filtered": datasets.Dataset.from_list(rows),
                               "raw": datasets.Dataset.from_list([{**r, "subset": "raw-only"} for r in rows[:5]])})
    dd.save_to_disk(str(tmp_path / "rb"))  # writes dataset_dict.json and one folder per split
    items, _ = rewardbench.load(bench_cfg("rewardbench", source=str(tmp_path / "rb")))
    assert len(items) == 46 and "raw-only" not in {it.subset for it in items}
    with pytest.raises(DataError, match=r"no split 'test' \(it has filtered, raw\)"):
        rewardbench.load(bench_cfg("rewardbench", source=str(tmp_path / "rb"), split="test"))
    rb2 = rows_of(FX / "rewardbench2_test.jsonl")
    datasets.Dataset.from_list(rb2).save_to_disk(str(tmp_path / "rb2"))  # state.json, dataset_info.json, .arrow
    items2, _ = rewardbench2.load(bench_cfg("rewardbench2", source=str(tmp_path / "rb2")))
    assert [it.uid for it in items2] == [r["id"] for r in rb2] and items2[-1].n_chosen == 3
    prior = rows_of(FX / "preference_test_sets.json")
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in prior.items()}).save_to_disk(str(tmp_path / "p"))
    items3, _ = rewardbench.load(bench_cfg("rewardbench", source=str(tmp_path / "rb"), prior_sets=str(tmp_path / "p")))
    assert {it.subset for it in items3 if it.meta["prior"]} == set(prior) - {"pku_better"}


# --------------------------------------------------------------------------- prior-set conversations
def test_prior_set_prompts_take_their_roles_by_position(tmp_path):
    """The official code builds the conversation user, assistant, user, ... whatever the stored role names, then the
    response; a prompt that ends with an assistant turn is refused (the official code asserts it)."""
    turns = [{"role": "human", "content": "q1"}, {"role": "gpt", "content": "a1"}, {"role": "human", "content": "q2"}]
    it = rewardbench.pair_item({"prompt": turns, "chosen": "good", "rejected": "bad", "subset": "x"}, "f:1", prior=True)
    assert conversations(it)[0] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "good"}]
    with pytest.raises(DataError, match=r"f:2.*'prompt' has 2 messages"):
        rewardbench.pair_item({"prompt": turns[:2], "chosen": "g", "rejected": "b", "subset": "x"}, "f:2", prior=True)


def test_two_local_copies_with_the_same_name_each_give_their_own_rows(tmp_path):
    """datasets caches a local folder by its name and card, not its files: rmlab must not be served the first
    copy's rows when it reads a second copy of the same name (another revision, edited files)."""
    rows = rows_of(FX / "rewardbench2_test.jsonl")
    older = [{**r, "prompt": "older revision: " + r["prompt"]} for r in rows]
    a = hub_cards.hub_layout(tmp_path / "a" / "reward-bench-2", hub_cards.RB2_COLUMNS, {"test": older})
    b = hub_cards.hub_layout(tmp_path / "b" / "reward-bench-2", hub_cards.RB2_COLUMNS, {"test": rows})
    items_a, _ = rewardbench2.load(bench_cfg("rewardbench2", source=str(a)))
    items_b, _ = rewardbench2.load(bench_cfg("rewardbench2", source=str(b)))
    assert [it.prompt for it in items_a] == [r["prompt"] for r in older]
    assert [it.prompt for it in items_b] == [r["prompt"] for r in rows]
