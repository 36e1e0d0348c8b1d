"""eval.py end to end: report.md, metrics.json and the PNGs; checkpoint and export agree; field mapping alone."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, compose, needs_shared_data

PNGS = {"reliability.png", "reward_hist.png", "length_bias.png", "acc_by_bucket.png"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: no thread-pool contention


def _eval(overrides, out):
    from rmlab.evaluate import run

    res = run(compose(overrides, out, "eval"))
    blob = json.loads((out / "metrics.json").read_text())
    assert PNGS <= {p.name for p in out.glob("*.png")}
    assert "## Headline" in (out / "report.md").read_text()
    assert blob["metrics"]["acc"] == pytest.approx(res["metrics"]["acc"])
    return blob


@pytest.mark.skipif(
    not (ROOT / "conf" / "data" / "local.yaml").exists(),
    reason="needs conf/data/local.yaml (the data group's own-file config)",
)
def test_own_field_names_through_field_mapping_alone(tiny_llama, tmp_path):
    from rmlab.data.simulator import SimulatorConfig, generate
    from rmlab.score import Scorer

    export = tiny_llama.save_pretrained(tmp_path / "export")
    groups = generate(SimulatorConfig(num_prompts=12, k=2, seed=7))
    src = tmp_path / "mine.jsonl"
    with open(src, "w") as f:
        for i, g in enumerate(groups):
            f.write(
                json.dumps(
                    {"question": g.prompt, "good": g.responses[0], "bad": g.responses[1], "category": "ab"[i % 2]}
                )
                + "\n"
            )
    blob = _eval(
        [
            "data=local",
            f"data.source={src}",
            "data.fields.prompt=question",
            "data.fields.chosen=good",
            "data.fields.rejected=bad",
            "data.fields.subset=category",
            f"model.name_or_path={export}",
        ],
        tmp_path / "ev",
    )
    m = blob["metrics"]
    assert blob["info"]["split"] == "all"  # not the training data: every record is scored
    assert m["n_comparisons"] == 12 and m["tie_rate"] == 0
    # the same pairs scored directly: eval's accuracy is the share where good > bad
    r = Scorer(tiny_llama, max_length=512).score([(g.prompt, g.responses) for g in groups])
    acc = [rw > rl for rw, rl in r]
    assert m["acc"] == pytest.approx(sum(acc) / 12)
    assert m["subset/a"] == pytest.approx(sum(acc[0::2]) / 6) and m["subset/b"] == pytest.approx(sum(acc[1::2]) / 6)
    assert m["bucket_confidence/q1"] is not None  # no margin/strength in the file: buckets by |r_w - r_l|


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from rmlab.train import run

    out = tmp_path_factory.mktemp("train")
    cfg = compose(
        [
            "model=tiny_llama",
            "trainer.max_steps=4",
            "data.simulator.num_prompts=100",
            "threads=1",
            "logger=wandb",
            "optim.lr=1e-3",
        ],
        out,
    )
    return out, run(cfg)


@pytest.mark.slow
def test_train_then_eval_checkpoint_and_export_agree(trained, tmp_path):
    run_dir, summary = trained
    tm = summary["metrics"]
    # the validation callback logged the report's metrics as val/...
    for k in (
        "val/ece",
        "val/brier",
        "val/length/pearson",
        "val/rank/kendall_tau",
        "val/truth/acc",
        "val/bucket_strength/3",
    ):
        assert k in tm
    media = {p.parent.name + "/" + p.name.split("_1_")[0] for p in (run_dir / "wandb").rglob("media/*/val/*")}
    assert {"val/reliability_diagram", "val/worst_comparisons"} <= media  # wandb dashboards (offline run)

    ck = _eval([f"ckpt_path={run_dir}/checkpoints/last.ckpt", "data.simulator.num_prompts=100"], tmp_path / "ck")
    assert ck["info"]["split"] == "val"  # same data as training: only the held-out prompts
    m = ck["metrics"]
    # the eval of the final checkpoint reproduces the final validation exactly
    assert m["acc"] == pytest.approx(tm["val/acc"], abs=1e-6)
    assert m["ece"] == pytest.approx(tm["val/ece"], abs=1e-6) and m["truth/acc"] == pytest.approx(
        tm["val/truth/acc"], abs=1e-6
    )
    assert 0 < m["tie_rate"] < 0.5 and m["truth/oracle_acc"] > 0.65  # 12 val prompts: a noisy oracle
    assert len(ck["worst"]) == 10 and ck["worst"][0]["reward_chosen"] < ck["worst"][0]["reward_rejected"]

    ex = _eval([f"model.name_or_path={run_dir}/export", "data.simulator.num_prompts=100"], tmp_path / "ex")
    assert ex["info"]["split"] == "val"  # the export sits in the run dir, so its training data is known
    for k in ("acc", "ece", "brier", "rank/kendall_tau", "length/pearson"):
        assert ex["metrics"][k] == pytest.approx(m[k], abs=1e-5)
    meta = json.loads((run_dir / "export" / "config.json").read_text())["rmlab"]
    assert meta["reward_mean"] == pytest.approx(m["reward_mean"], abs=1e-5)  # export stats = val rewards


@pytest.mark.slow
@pytest.mark.shared_data
@needs_shared_data
@pytest.mark.skipif(not (ROOT / "conf" / "data" / "pandalm.yaml").exists(), reason="needs conf/data/pandalm.yaml")
def test_eval_checkpoint_on_pandalm(trained, tmp_path):
    run_dir, _ = trained
    blob = _eval(
        [f"ckpt_path={run_dir}/checkpoints/last.ckpt", "data=pandalm", "data.max_records=200"], tmp_path / "pl"
    )
    m, t = blob["metrics"], blob["tables"]
    assert blob["info"]["split"] == "all"  # a dataset the model never saw: all of it
    assert m["n_ties"] > 0 and 0 < m["tie_rate"] < 1  # PandaLM's annotators split or vote tie
    assert len(t["subset"]) >= 2
    assert t["buckets"]["kind"] == "strength"  # agreement 3:0 vs 2:1 -> strength buckets
    assert sum(n for _, n in t["subset"].values()) == m["n_comparisons"]
