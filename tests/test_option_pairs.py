"""Options combined across config groups (an all-pairs sweep found each of these): every combination a user can
type composes, and the cheap ones run a few real steps."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import ROOT, compose, needs_shared_data

DATA_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml"))
# Batching keys the datamodule reads from every source (rmlab.data.datamodule): each data config must carry them,
# or `data=<name> data.<key>=...` stops at Hydra's "Could not override" although the option applies.
BATCHING = ["data.pair_batching=shuffled", "data.budget=packed", "data.padding_side=left", "data.num_workers=0",
            "data.pin_memory=false", "data.max_train_prompts=10"]


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_every_data_config_takes_the_batching_options(data, tmp_path):
    cfg = compose([f"data={data}", *BATCHING], tmp_path)
    assert cfg.data.pair_batching == "shuffled" and cfg.data.budget == "packed"
    assert cfg.data.padding_side == "left" and cfg.data.max_train_prompts == 10


@needs_shared_data
def test_pandalm_shuffled_packed_budget_runs(tmp_path, one_thread):
    from rmlab.train import run

    cfg = compose(["model=tiny_llama", "data=pandalm", "data.max_records=60", "data.pair_batching=shuffled",
                   "data.budget=packed", "trainer.max_steps=2", "threads=1", "export=false"], tmp_path)
    summary = run(cfg)
    assert summary["train_steps"] == 2
    report = json.loads((tmp_path / "data_report.json").read_text())
    for split in ("train", "val"):
        recs = report[split]["records"]
        assert recs["loaded"] == recs["kept"] + sum(recs["dropped"].values())


# Combinations that ran but could not train, or ran without the option: refused before anything loads, the message
# naming the key and what to set. Each test runs train's entry point, so before the check each of these crashed at
# the first step (flex) or trained silently without the option.
REFUSED = [
    # FlexAttention has no backward on CPU: NotImplementedError at step 1 (the sweep's traceback).
    (["model=tiny_llama", "model.attention=flex"], "model.attention", "set model.attention=auto"),
    # The attribute head always runs padded and uncompiled: these keys were accepted and ignored.
    (["model=attributes", "loss=attributes", "model.forward_mode=prefix_shared"], "model.forward_mode",
     "set model.forward_mode=auto"),
    (["model=attributes", "loss=attributes", "model.compile=true"], "model.compile", "set model.compile=false"),
    (["model=attributes", "loss=attributes", "model.attention=sdpa"], "model.attention", "set model.attention=auto"),
    # A kernel for rmlab's packed attention, on a model that does not use it.
    (["model=tiny_llama", "model.forward_mode=padded", "model.attention=sdpa"], "model.attention",
     "set model.attention=auto"),
    (["model=tiny_llama", "model.attn_implementation=eager", "model.attention=varlen"], "model.attention",
     "set model.attention=auto"),
    # A packed token budget on a padded model counts padded tokens.
    (["model=tiny_llama", "model.forward_mode=padded", "data.budget=packed"], "data.budget", "set data.budget=padded"),
    (["model=attributes", "loss=attributes", "data.budget=packed"], "data.budget", "set data.budget=padded"),
    # An encoder always runs padded (rmlab.models.packing.resolve_forward_mode): packed modes were silently padded.
    (["model=minilm", "model.forward_mode=packed"], "model.forward_mode", "set model.forward_mode=auto"),
    (["model=minilm", "model.attention=sdpa"], "model.attention", "set model.attention=auto"),
    (["model=minilm", "data.budget=packed"], "data.budget", "set data.budget=padded"),
    # Generative and CLoud heads have no packed layout either.
    (["model=generative_verifier", "data.budget=packed"], "data.budget", "set data.budget=padded"),
    (["model=cloud", "loss=cloud", "data.budget=packed"], "data.budget", "set data.budget=padded"),
    # Lightning replaced fp16 AMP on CPU by bf16-mixed, with only a warning.
    (["model=tiny_llama", "trainer.precision=16-mixed"], "trainer.precision", "set trainer.precision=bf16-mixed"),
    # The judge's rows are comparisons: no per-response score or rank (the sweep: a data error naming the simulator).
    (["model=pairwise_judge", "loss=regression"], "model.head", "use loss=answer_ce"),
    (["model=pairwise_judge", "loss=plackett_luce"], "model.head", "use loss=answer_ce"),
]


@pytest.mark.parametrize("overrides,key,hint", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_meaningless_combination_is_refused_naming_the_key(overrides, key, hint, tmp_path):
    from rmlab.train import run
    from rmlab.validate import ConfigError

    cfg = compose([*overrides, "data.simulator.num_prompts=40", "trainer.max_steps=2", "threads=1"], tmp_path)
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert [p.key for p in info.value.problems] == [key], str(info.value)
    assert hint in str(info.value), str(info.value)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything ran


@pytest.mark.parametrize("overrides", [
    ["model=tiny_llama", "model.attention=sdpa"],  # the packed modes' kernel, on a model that packs
    ["model=attributes", "loss=attributes", "model.forward_mode=padded"],  # what the head runs anyway
    ["model=tiny_llama", "model.forward_mode=packed", "data.budget=packed"],
])
def test_meaningful_speed_settings_still_pass(overrides, tmp_path):
    from rmlab.validate import check_config

    assert check_config(compose(overrides, tmp_path)) == []


def test_empty_validation_split_is_a_warning_not_a_silent_nan(tmp_path, caplog, one_thread):
    # The sweep's alpaca_eval2 run with data.format_options.max_prompts=24 held out no prompt (the split hashes the
    # prompt text): val_acc was NaN in metrics.json with only Lightning's "DataLoader ... is zero" to say why.
    from rmlab.train import run

    cfg = compose(["model=tiny_llama", "data.simulator.num_prompts=5", "data.val_fraction=0.05", "trainer.max_steps=1",
                   "threads=1", "export=false", "seed=3"], tmp_path)
    with caplog.at_level(logging.WARNING, logger="rmlab"):
        summary = run(cfg)
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["val"]["groups"] == 0 and report["train"]["groups"] == 5  # the case under test
    assert summary["train_steps"] == 1
    warned = [r.getMessage() for r in caplog.records if "no validation groups" in r.getMessage()]
    assert warned and "data.val_fraction=0.05 of 5 prompts" in warned[0] and "data.val_source" in warned[0], warned


def _pairs_file(path):
    """Plain pairs with no ranks, scores or 0/1 labels, as PandaLM or HH give."""
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {i}."}
            for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# The sweep's runs of these losses on pairwise data (pandalm, hh_harmless, alpaca_eval2, prometheus) logged a
# training loss of exactly 0 at every step: the loss masks responses without its field, so nothing trained.
NO_FIELD = [
    (["loss=plackett_luce"], "rank", "data.format=rankings"),
    (["loss=answer_ce"], "label", "model=pairwise_judge"),
    (["loss=regression"], "score", "data.format=ratings"),
    (["model=attributes", "loss=regression"], "score", "data.format=ratings"),
    (["model=cloud", "loss=answer_ce"], "label", "model=pairwise_judge"),  # wrapped with the critique LM term
]


@pytest.mark.parametrize("overrides,field,hint", NO_FIELD, ids=[" ".join(n[0]) for n in NO_FIELD])
def test_loss_whose_field_the_data_lacks_is_refused_before_a_step(overrides, field, hint, tmp_path):
    from rmlab.data.sources import DataError
    from rmlab.train import run

    data = _pairs_file(tmp_path / "pairs.jsonl")
    cfg = compose(["model=tiny_llama", *overrides, "data=local", f"data.source={data}", "trainer.max_steps=2",
                   "threads=1", "export=false"], tmp_path / "run")
    with pytest.raises(DataError) as info:
        run(cfg)
    msg = str(info.value)
    assert f"batch.{field}" in msg and "data=local" in msg and "loss would be 0" in msg and hint in msg, msg
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))  # refused before the first step


def test_listwise_loss_on_ranked_simulator_data_still_trains(tmp_path, one_thread):
    """The field check must not refuse Plackett-Luce on the simulator (it has ranks): the loss is not 0, every
    parameter moves and the model learns (64% val accuracy, ~20 s on one thread)."""
    import csv

    import torch
    from hydra.utils import instantiate

    from rmlab.train import run

    cfg = compose(["model=tiny_llama", "loss=plackett_luce", "data.simulator.num_prompts=400",
                   "module.lr=3e-3", "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "threads=1", "export=false"],
                  tmp_path)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in instantiate(cfg.model, _convert_="all").state_dict().items()}
    summary = run(cfg)
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = {k.removeprefix("model."): v for k, v in trained.items() if k.startswith("model.")}
    params = {k for k, _ in instantiate(cfg.model, _convert_="all").named_parameters()}
    assert params and params <= set(trained)
    assert not [k for k in params if torch.equal(before[k], trained[k])], "every parameter should have moved"
    with open(tmp_path / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert len(losses) == summary["train_steps"] > 50 and min(losses) > 0  # a listwise loss on real ranks, never 0
    assert summary["val_acc"] > 0.58 and summary["val_acc"] > summary["length_acc"] + 0.05, summary
