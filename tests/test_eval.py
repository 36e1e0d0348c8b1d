"""eval.py end to end: report.md, metrics.json and the PNGs; checkpoint and export agree; field mapping alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.conftest import compose, needs_shared_data

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


# conf/data/*.yaml are the repo's own files: a missing one fails these tests (it used to skip them)
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
    # No margin/strength in the file: buckets by quartiles of |r_w - r_l|. q1 (below the first quartile
    # of the 12 gaps, i.e. the 3 least confident comparisons) recomputed from the direct scores.
    gaps = [abs(rw - rl) for rw, rl in r]
    low = [i for i, x in enumerate(gaps) if x < float(np.quantile(gaps, 0.25))]
    assert len(low) == 3
    q1 = m["bucket_confidence/q1"]
    assert isinstance(q1, float) and math.isfinite(q1) and q1 == pytest.approx(sum(acc[i] for i in low) / 3)


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
            "module.lr=1e-3",
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
    hf_cfg = json.loads((run_dir / "export" / "config.json").read_text())
    meta = hf_cfg["rmlab"]
    assert meta["reward_mean"] == pytest.approx(m["reward_mean"], abs=1e-5)  # export stats = val rewards
    assert (hf_cfg["mean"], hf_cfg["std"]) == (meta["reward_mean"], meta["reward_std"])  # OpenRLHF's keys


@pytest.mark.slow
@pytest.mark.shared_data
@needs_shared_data
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


@pytest.mark.slow
@pytest.mark.shared_data
@needs_shared_data
def test_done_when_train_on_hh_harmless_then_eval_on_pandalm(tmp_path):
    """Issue 6's Done-when: train briefly on data=hh_harmless, then eval.py with that run's checkpoint
    and data=pandalm writes report.md, metrics.json with every metric of the issue, and >= 4 PNGs."""
    import math

    from rmlab.train import run

    run_dir = tmp_path / "train"
    run(
        compose(
            ["model=tiny_llama", "data=hh_harmless", "data.max_records=200", "trainer.max_steps=3", "threads=1"],
            run_dir,
        )
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    out = tmp_path / "eval"
    blob = _eval([f"ckpt_path={ckpt}", "data=pandalm", "data.max_records=200"], out)
    m = blob["metrics"]
    assert len(list(out.glob("*.png"))) >= 4
    assert blob["info"]["split"] == "all"  # trained on HH: all of PandaLM is unseen

    def finite(key):
        assert key in m and m[key] is not None and math.isfinite(m[key]), key

    # accuracy (strict) and the tie rate apart: whole counts, the ties a share of every labelled comparison
    for k in ("acc", "tie_rate", "pred_tie_rate", "n_comparisons", "n_ties"):
        finite(k)
    n = m["n_comparisons"]
    assert n == int(n) > 0 and m["n_ties"] == int(m["n_ties"]) > 0
    assert m["tie_rate"] == pytest.approx(m["n_ties"] / (n + m["n_ties"]), abs=1e-12)
    assert m["acc"] * n == pytest.approx(round(m["acc"] * n), abs=1e-6)  # a share of the n comparisons
    # per subset (PandaLM's motivation_app): the subsets split the n comparisons, their accuracies average to acc,
    # and with no sections the section score is the plain mean over subsets
    t = blob["tables"]
    subsets = [k for k in m if k.startswith("subset/")]
    assert len(subsets) == len(t["subset"]) >= 2
    assert sum(c for _, c in t["subset"].values()) == n
    assert sum(a * c for a, c in t["subset"].values()) / n == pytest.approx(m["acc"], abs=1e-9)
    assert all(m[f"subset/{s}"] == a for s, (a, _) in t["subset"].items())
    assert m["section/score"] == pytest.approx(sum(a for a, _ in t["subset"].values()) / len(t["subset"]), abs=1e-12)
    # per strength bucket (annotator agreement 3:0 -> 3, 2:1 -> 1): every non-tie comparison in one bucket
    assert t["buckets"]["kind"] == "strength"
    buckets = [k for k in m if k.startswith("bucket_strength/")]
    assert buckets and sum(c for _, c in t["buckets"]["acc"].values()) == n
    assert sum(a * c for a, c in t["buckets"]["acc"].values()) / n == pytest.approx(m["acc"], abs=1e-9)
    # calibration of sigmoid(r_w - r_l): the ECE is the count-weighted gap of the reliability bins (each
    # comparison counted both ways round: 2n points)
    rel = t["reliability"]
    assert sum(b["count"] for b in rel) == 2 * n
    ece = sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in rel if b["count"]) / (2 * n)
    assert m["ece"] == pytest.approx(ece, abs=1e-9) and 0 < m["brier"] < 1
    # the reward distributions of chosen and rejected
    for k in (
        "reward_mean",
        "reward_std",
        "reward_gap",
        "reward/chosen_mean",
        "reward/chosen_std",
        "reward/rejected_mean",
        "reward/rejected_std",
    ):
        finite(k)
    assert m["reward_gap"] == pytest.approx(m["reward/chosen_mean"] - m["reward/rejected_mean"], abs=1e-9)
    # length bias: correlation with length, accuracy split by whether the chosen is the longer one
    for k in (
        "length/pearson",
        "length/spearman",
        "length/chosen_longer_rate",
        "length/acc_chosen_longer",
        "length/acc_chosen_shorter",
    ):
        finite(k)
    assert -1 <= m["length/pearson"] <= 1 and 0 < m["length/chosen_longer_rate"] < 1
    # each split accuracy is a share of its comparisons: longer-chosen ones number rate * n
    k = m["length/chosen_longer_rate"] * n
    assert k == pytest.approx(round(k), abs=1e-6) and m["length/acc_chosen_longer"] * k == pytest.approx(
        round(m["length/acc_chosen_longer"] * k), abs=1e-6)
    # Kendall tau / Spearman rho apply within ranked K-wise groups; PandaLM has pairwise labels only,
    # so they are reported as n/a (null) over 0 groups (docs/eval.md)
    assert {"rank/kendall_tau", "rank/spearman_rho", "rank/n_groups"} <= set(m)
    assert m["rank/n_groups"] == 0 and m["rank/kendall_tau"] is None and m["rank/spearman_rho"] is None
    report = (out / "report.md").read_text()
    assert all(p in report for p in PNGS)  # the plots are linked from the report


def test_split_auto_treats_a_missing_simulator_key_as_its_default(tmp_path):
    """A run saved before data.simulator.hack_rate existed trained on the same data as hack_rate=0: its val."""
    from omegaconf import OmegaConf

    from rmlab.evaluate import pick_split

    now = compose([], tmp_path, "eval").data
    old = OmegaConf.to_container(now, resolve=True)
    del old["simulator"]["hack_rate"], old["simulator"]["hack_strength"]
    assert pick_split("auto", now, OmegaConf.create({"data": old})) == "val"
    old["simulator"]["hack_rate"] = 0.2  # other data: never its val set
    assert pick_split("auto", now, OmegaConf.create({"data": old})) == "all"


@pytest.mark.parametrize(
    "train_overrides",
    [
        ["model=cloud", "data=prometheus", "seed=3"],  # issue 18's run: eval.py's default data is the simulator
        ["experiment=overopt", "seed=2"],  # the hackable simulator, data seed pinned to 0, 1,600 prompts
        ["data.simulator.num_prompts=600", "data.simulator.k=4", "seed=1"],
        ["data=alpaca_eval2", "data.val_fraction=0.2"],
        ["experiment=odin_alpaca", "seed=1"],  # 240 of 805 prompts, K = 4, rows of 128 tokens
        ["data=local", "data.source=/data/mine.jsonl", "data.format=ratings"],  # a user's own file
        # list-valued fields (they were left off the line, and eval.py read the file with the config's fields)
        ["data=local", "data.source=/data/mine.jsonl", "data.fields.prompt=[instruction,'my input']",
         "data.fields.attributes=[helpfulness,correctness]"],
    ],
)
def test_the_printed_eval_command_scores_the_runs_own_val_split(train_overrides, tmp_path):
    """The run summary's `next: python eval.py ckpt_path=...` names the data, seed and data keys that make eval.py
    score the run's own val split; without them eval.py scored the default simulator (all of it)."""
    import shlex

    from omegaconf import OmegaConf

    from rmlab.evaluate import pick_split
    from rmlab.summary import eval_args, format_summary, python_command

    run_cfg = compose(train_overrides, tmp_path / "run")
    run_cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=True))  # as config.yaml holds it
    bare = compose([f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt"], tmp_path / "eval", "eval")
    assert pick_split("auto", bare.data, run_cfg) == "all"  # the bare command misses the training data
    args = eval_args(run_cfg)
    ev = compose([f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt", *args], tmp_path / "eval", "eval")
    assert pick_split("auto", ev.data, run_cfg) == "val", args
    assert ev.data.name == run_cfg.data.name
    for key in ("format_options", "max_length", "max_records", "val_fraction"):  # the same examples, rows as trained
        assert OmegaConf.to_container(ev.data, resolve=True).get(key) == OmegaConf.to_container(run_cfg.data).get(key), key
    summary = {"run_dir": "R", "val_acc": 0.5, "oracle_acc": None, "length_acc": None, "train_steps": 1, "minutes": 0.1,
               "eval_args": args}
    lines = format_summary(summary).splitlines()
    line = next(x for x in lines if x.startswith(f"  next: {python_command()} eval.py "))
    assert shlex.split(line.split(" eval.py ", 1)[1]) == ["ckpt_path=R/checkpoints/last.ckpt", *args]
    ev_data, run_data = OmegaConf.to_container(ev.data, resolve=True), OmegaConf.to_container(run_cfg.data)
    for key in ("fields", "source"):  # the fields the records are read by, lists included
        assert ev_data.get(key) == run_data.get(key), key


def test_the_default_runs_eval_command_stays_bare(tmp_path):
    from rmlab.summary import eval_args

    assert eval_args(compose([], tmp_path)) == []


def test_the_printed_eval_command_of_a_sweep_job_runs_as_printed(tmp_path):
    """A -m sweep's job dirs are named by their overrides (`0_loss=bt,seed=1`): printed bare, the `next:` line's
    ckpt_path held `=` and `,`, and eval.py stopped at Hydra's parser ("mismatched input '='"). The line, split as
    a shell splits it, must compose eval.py's config with the path and the data source unchanged."""
    import shlex

    from rmlab.summary import format_summary, python_command

    run_dir = f"{tmp_path}/multiruns/2026-12-05_20-07-29/3_loss=margin,seed=2,threads=1,trainer.max_steps=20"
    source = f"{tmp_path}/my data,v2.jsonl"
    summary = {"run_dir": run_dir, "val_acc": 0.5, "oracle_acc": None, "length_acc": None, "train_steps": 1,
               "minutes": 0.1, "export_dir": f"{run_dir}/export",
               "eval_args": ["data=local", f"data.source={source}", "seed=2"]}
    lines = format_summary(summary).splitlines()
    line = next(x for x in lines if x.startswith(f"  next: {python_command()} eval.py "))
    argv = shlex.split(line.split(" eval.py ", 1)[1])
    ev = compose(argv, tmp_path / "eval", "eval")
    assert ev.ckpt_path == f"{run_dir}/checkpoints/last.ckpt"
    assert ev.data.source == source and ev.seed == 2
    score = next(x for x in lines if "python -m rmlab.score" in x)
    assert shlex.split(score.split("--model ", 1)[1]) == [f"{run_dir}/export"]


TRICKY = ["plain", "my data,v2.jsonl", "it's", "a\\b", "C:\\dir\\x y", "c:\\", "a\\'b", "\\\\", "x=y", "$HOME", "a b\"c",
          "1", "true", "null", "-1", "inf", "1e5", "[a]", "#", "é ü"]


@pytest.mark.parametrize("value", TRICKY)
def test_a_printed_override_parses_back_to_the_same_value(value):
    """The next: line's overrides, split as a shell splits them and parsed by Hydra's own override parser, give
    back the run's value: a string stays that string (backslashes, quotes, commas, '1' and 'true'), a list that list."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rmlab.summary import _OTHER_TYPE, cli_override, hydra_list

    parser = OverridesParser.create()

    def back(arg: str):
        (word,) = shlex.split(cli_override(arg))
        return parser.parse_override(word).value()

    # A scalar: eval_args writes numbers, booleans and None as they read ('1', 'true', 'null') and its own lists as
    # lists, so those are Hydra's to type; every other string comes back as it was.
    if not value.startswith("[") and not _OTHER_TYPE.fullmatch(value):
        assert back(f"data.source={value}") == value
    items = [value, "input", None, [value]]
    assert back(f"data.fields.prompt={hydra_list(items)}") == items
