"""Ensembles (rmlab.models.ensemble): each combination on hand-made scores, then the ensemble model through
rmlab.score's Scorer, the rmlab.score command and eval.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rmlab.models.ensemble import EnsembleRewardModel, combine, member_stats
from tests.conftest import TINY_LLAMA, compose

pytestmark = pytest.mark.usefixtures("one_thread")


def test_combinations_on_hand_made_scores():
    z = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, -1.0]])  # 2 members x 3 rows
    assert combine(z, "mean").tolist() == [2.0, 2.0, 1.0]
    assert combine(z, "min").tolist() == [1.0, 2.0, -1.0]
    # population std over the members: (1, 3) -> 1, (2, 2) -> 0, (3, -1) -> 2
    assert combine(z, "uwo", lam=1.0).tolist() == [1.0, 2.0, -1.0]
    assert combine(z, "uwo", lam=0.5).tolist() == [1.5, 2.0, 0.0]
    assert combine(z, "uwo", lam=0.0).tolist() == combine(z, "mean").tolist()
    z3 = torch.tensor([[0.0], [3.0], [6.0]])  # mean 3, min 0, population std sqrt(6)
    assert combine(z3, "mean").item() == 3.0 and combine(z3, "min").item() == 0.0
    assert combine(z3, "uwo", lam=2.0).item() == pytest.approx(3.0 - 2.0 * 6.0**0.5)
    with pytest.raises(ValueError, match="mean | min | uwo"):
        combine(z, "max")
    with pytest.raises(ValueError, match=r"\[members, rows\]"):
        combine(torch.zeros(3), "mean")


def test_member_stats_come_from_the_export():
    assert member_stats({"reward_mean": 0.5, "reward_std": 2.0}, "a") == (0.5, 2.0)
    assert member_stats({"reward_mean": 0.5, "reward_std": 0.0}, "a") == (0.5, 1.0)  # a constant model: no divide by 0
    with pytest.raises(ValueError, match="member b has no reward_mean"):
        member_stats({}, "b")


def _tiny(seed: int):
    from rmlab.models import build_model

    torch.manual_seed(seed)
    return build_model(config=TINY_LLAMA, tokenizer="byt5").eval()


ITEMS = [("What is 2 plus 3?", ["The answer is 5.", "The answer is 6.", "Ugh."]), ("Hi?", ["Hello there.", "No."])]


@pytest.mark.parametrize("how", ["mean", "min", "uwo"])
def test_ensemble_model_scores_the_combination_of_normalized_members(how):
    from rmlab.score import Scorer

    members, stats = [_tiny(1), _tiny(2), _tiny(3)], [(0.1, 2.0), (-0.3, 0.5), (0.0, 1.0)]
    ens = EnsembleRewardModel(members, stats, how, lam=0.7)
    got = Scorer(ens).score(ITEMS)
    singles = [Scorer(m).score(ITEMS) for m in members]
    for g, item in enumerate(ITEMS):
        z = np.array([[(s[g][r] - mu) / sd for r in range(len(item[1]))] for s, (mu, sd) in zip(singles, stats)])
        want = {"mean": z.mean(0), "min": z.min(0), "uwo": z.mean(0) - 0.7 * z.std(0)}[how]
        assert got[g] == pytest.approx(want.tolist(), abs=1e-5)


def test_members_must_read_the_same_rows(minilm):
    with pytest.raises(ValueError, match="another tokenizer"):
        EnsembleRewardModel([_tiny(1), minilm], [(0, 1), (0, 1)])
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleRewardModel([_tiny(1)], [(0, 1)])
    with pytest.raises(ValueError, match="not exported as one model"):
        EnsembleRewardModel([_tiny(1), _tiny(2)], [(0, 1), (0, 1)]).save_pretrained("/nonexistent")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("exports")
    out = []
    for seed, (mu, sd) in zip((1, 2), ((0.2, 1.5), (-0.1, 0.4))):
        out.append(str(_tiny(seed).save_pretrained(d / f"m{seed}", extra={"reward_mean": mu, "reward_std": sd})))
    return out


def test_score_command_with_an_ensemble(exports, tmp_path):
    from rmlab.score import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, rs in ITEMS for r in rs))
    singles = []
    for i, e in enumerate(exports):
        main([str(src), "--model", e, "--normalize", "-o", str(tmp_path / f"s{i}.jsonl"), "--no-progress"])
        singles.append([json.loads(x)["reward"] for x in (tmp_path / f"s{i}.jsonl").read_text().splitlines()])
    z = np.array(singles)
    main([str(src), "--model", exports[0], "--model", exports[1], "--combine", "uwo", "--lam", "0.5",
          "-o", str(tmp_path / "e.jsonl"), "--no-progress"])
    got = [json.loads(x)["reward"] for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert got == pytest.approx((z.mean(0) - 0.5 * z.std(0)).tolist(), abs=1e-5)
    with pytest.raises(SystemExit, match="already normalized"):
        main([str(src), "--model", exports[0], "--model", exports[1], "--normalize", "-o", str(tmp_path / "x.jsonl")])


def test_eval_with_an_ensemble(exports, tmp_path):
    from rmlab.evaluate import run

    overrides = [f"ensemble.members=[{exports[0]},{exports[1]}]", "ensemble.combine=min", "split=all",
                 "data.simulator.num_prompts=30", "data.max_length=256", "threads=1"]
    res = run(compose(overrides, tmp_path / "ev", "eval"))
    m = res["metrics"]
    assert res["info"]["responses"] == 90 and "ensemble min" in res["info"]["model"]
    # The same 30 prompts (the simulator at the run's seed, 0) scored by each member alone, normalized with its
    # export's (mean, std), combined by min by hand: eval's accuracy and the disagreement numbers follow from them.
    from rmlab.data.simulator import SimulatorConfig, generate
    from rmlab.models import build_model
    from rmlab.score import Scorer

    groups = generate(SimulatorConfig(num_prompts=30, seed=0))
    items = [(g.prompt, g.responses) for g in groups]
    z = []
    for path, (mu, sd) in zip(exports, ((0.2, 1.5), (-0.1, 0.4))):
        scored = Scorer(build_model(name_or_path=path), max_length=256).score(items)
        z.append([[(r - mu) / sd for r in rs] for rs in scored])
    right = [float(min(z[0][i][c.winner], z[1][i][c.winner]) > min(z[0][i][c.loser], z[1][i][c.loser]))
             for i, g in enumerate(groups) for c in g.comparisons if not c.tie]
    assert m["n_comparisons"] == len(right) and 0 < sum(right) < len(right)
    assert m["acc"] == pytest.approx(sum(right) / len(right), abs=1e-9)
    flat = np.array([[x for rs in zm for x in rs] for zm in z])  # [2 members, 90 responses]
    assert m["head/ensemble/member_std_mean"] == pytest.approx(float(np.abs(flat[0] - flat[1]).mean() / 2), abs=1e-4)
    assert m["head/ensemble/member_corr_mean"] == pytest.approx(float(np.corrcoef(flat)[0, 1]), abs=1e-4)


def test_eval_ensemble_config_errors(tmp_path):
    from rmlab.validate import check_config

    with pytest.raises(Exception, match="ensemble.members"):
        check_config(compose(["ensemble.members=[onlyone]"], tmp_path, "eval"), entry="eval")
    with pytest.raises(Exception, match="ensemble.combine"):
        check_config(compose(["ensemble.members=[a,b]", "ensemble.combine=max"], tmp_path, "eval"), entry="eval")


def _in_run_dir(export: str, root, train_overrides: list[str]) -> str:
    """The export copied into a run dir whose config.yaml is a training run's with ``train_overrides``."""
    import shutil

    from omegaconf import OmegaConf

    root.mkdir(parents=True)
    cfg = compose(["data.max_length=256", *train_overrides], root)
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), root / "config.yaml")
    return str(shutil.copytree(export, root / "export"))


def test_an_ensemble_of_members_trained_on_other_splits_is_warned_in_its_report(exports, tmp_path):
    """split=auto is the first member's val split; a member trained at another seed on the same file (the split
    follows the seed) trained on part of that set. The eval says so (log and report.md) and how to train members
    that share one split. The simulator at another seed generates other examples: no warning there."""
    from rmlab.evaluate import run

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A good answer, number {i}.",
                                         "rejected": "No."}) + "\n" for i in range(40)))
    local = ["data=local", f"data.source={pairs}", "data.format=pairs"]

    def ensemble_eval(name: str, data: list[str], overrides: list[list[str]]):
        members = [_in_run_dir(e, tmp_path / name / f"run{i}", [*data, *o])
                   for i, (e, o) in enumerate(zip(exports, overrides))]
        res = run(compose([f"ensemble.members=[{','.join(members)}]", "seed=1", *data, "data.max_length=256",
                           "threads=1"], tmp_path / name / "ev", "eval"))
        return res, members, (tmp_path / name / "ev" / "report.md").read_text()

    res, members, report = ensemble_eval("seeds", local, [["seed=1"], ["seed=2"]])
    assert res["info"]["split"] == "val"
    warning = res["info"]["split_warning"]
    assert f"but {members[1]} trained on another split of this data" in warning and "data.seed=0" in warning
    assert f"- **warning**: {warning}" in report
    # One data seed for every member (the recipe the warning gives): their shared val set, no warning.
    res, _, report = ensemble_eval("one_split", local, [["seed=1", "data.seed=1"], ["seed=2", "data.seed=1"]])
    assert res["info"]["split"] == "val" and "split_warning" not in res["info"] and "**warning**" not in report
    # The simulator at seeds 1 and 2: other prompts and responses, none of seed 1's val set trained on.
    sim = ["data.simulator.num_prompts=30"]
    res, _, report = ensemble_eval("simulator", sim, [["seed=1"], ["seed=2"]])
    assert res["info"]["split"] == "val" and "split_warning" not in res["info"]
    # A member copied out of its run dir (no config.yaml beside it): unknown, said as such.
    from omegaconf import OmegaConf

    from rmlab.evaluate import ensemble_split_leak

    first = OmegaConf.load(tmp_path / "seeds" / "run0" / "config.yaml")
    data = compose(["seed=1", *local], tmp_path / "unknown", "eval").data
    said = ensemble_split_leak(["a/export", "b/export"], [first, None], data)
    assert "b/export has no training run config beside it" in said and "trained on another split" not in said
    assert ensemble_split_leak(["a/export", "b/export"], [first, first], data) is None
    # Hub data with its own test split (hh_rlhf, ultrafeedback): the seed orders, it does not pick the held-out set.
    for name in ("hh_rlhf", "ultrafeedback"):
        runs = [OmegaConf.create(OmegaConf.to_container(compose([f"data={name}", f"seed={s}"], tmp_path / name / str(s)),
                                                         resolve=True)) for s in (1, 2)]
        assert ensemble_split_leak(["a", "b"], runs, compose([f"data={name}", "seed=1"], tmp_path, "eval").data) is None
    many = ensemble_split_leak(["a", "b", "c"], [first, None, None], data)
    assert "b, c have no training run config beside them" in many
