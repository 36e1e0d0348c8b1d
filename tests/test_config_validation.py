"""Config validation (rmlab.validate.check_config): a bad setting is a ConfigError naming the key, the bad value
and what is valid, raised before anything heavy loads; through train.py / eval.py it is a message on stderr
(exit status 1, no traceback). Every shipped config passes (no false alarms)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rmlab.validate import ConfigError, check_config
from tests.conftest import ROOT, compose

# (overrides, the key the message must name, the value as typed)
BAD = [
    (["trainer.max_steps=abc"], "trainer.max_steps", "abc"),
    (["trainer.max_steps=0"], "trainer.max_steps", "0"),
    (["trainer.max_steps=1.5"], "trainer.max_steps", "1.5"),
    (["trainer.max_epochs=0"], "trainer.max_epochs", "0"),
    (["trainer.max_epochs=-1", "trainer.max_steps=-1"], "trainer.max_epochs", "-1"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", "0"),
    (["trainer.val_check_interval=1.5"], "trainer.val_check_interval", "1.5"),
    (["module.lr=-1"], "module.lr", "-1"),
    (["module.lr=0"], "module.lr", "0"),
    (["module.lr=abc"], "module.lr", "abc"),
    (["module.weight_decay=-0.1"], "module.weight_decay", "-0.1"),
    (["module.warmup_ratio=1.0"], "module.warmup_ratio", "1.0"),
    (["module.min_lr_ratio=1.5"], "module.min_lr_ratio", "1.5"),
    (["module.scheduler=cosin"], "module.scheduler", "cosin"),
    (["module.betas=[0.9,1.0]"], "module.betas", "[0.9, 1.0]"),
    (["seed=-1"], "seed", "-1"),
    (["seed=4294967296"], "seed", "4294967296"),
    (["threads=0"], "threads", "0"),
    (["ckpt_path=/no/such/file.ckpt"], "ckpt_path", "/no/such/file.ckpt"),
    (["data.max_length=1"], "data.max_length", "1"),
    (["data.max_length=19", "data.min_prompt_tokens=16"], "data.max_length", "19"),
    (["data.max_tokens=4"], "data.max_tokens", "4"),
    (["data.max_responses=1"], "data.max_responses", "1"),
    (["data.val_fraction=1.0"], "data.val_fraction", "1.0"),
    (["data.val_fraction=-0.1"], "data.val_fraction", "-0.1"),
    (["data.on_error=ignore"], "data.on_error", "ignore"),
    (["data.padding_side=center"], "data.padding_side", "center"),
    (["data.pair_batching=random"], "data.pair_batching", "random"),
    (["data=local", "data.source=x.jsonl", "data.max_records=0"], "data.max_records", "0"),
    (["data.format=csv"], "data.format", "csv"),
    (["data.global_batch_comparisons=3", "trainer.accumulate_grad_batches=2"], "data.global_batch_comparisons", "3"),
    (["data.simulator.k=1"], "data.simulator.k", "1"),
    (["loss.balance=eq6"], "loss.balance", "eq6"),
    (["loss=attributes", "model=minilm"], "model.head", "scalar"),
    (["model.head=scaler"], "model.head", "scaler"),
    (["data=local"], "data.source", "???"),
    (["model=hf"], "model.name_or_path", "null"),
]


def _check(overrides, tmp_path, entry="train"):
    return check_config(compose(overrides, tmp_path, "train" if entry == "train" else "eval"), entry=entry)


@pytest.mark.parametrize("overrides,key,value", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_setting_is_a_config_error_naming_key_value_and_what_is_valid(overrides, key, value, tmp_path):
    with pytest.raises(ConfigError) as info:
        _check(overrides, tmp_path)
    e = info.value
    assert isinstance(e, ValueError)
    assert [p.key for p in e.problems] == [key], str(e)
    msg = str(e)
    assert msg.startswith(f"{key}={value}: "), msg
    assert any(w in msg for w in ("must", "required", "set ", "no such")), msg  # says what is valid


@pytest.mark.parametrize(
    "override, guess, valid",
    [
        ("+module.lrr=0.001", "module.lr", "betas, eps, loss, lr, min_lr_ratio"),
        ("+trainer.max_stepz=3", "trainer.max_steps", "max_epochs"),
        ("+callbacks.model_checkpoint.every_n_trian_steps=5", "callbacks.model_checkpoint.every_n_train_steps", "save_last"),
        ("+logger.csv.nmae=x", "logger.csv.name", "save_dir"),
    ],
)
def test_a_key_the_class_does_not_take_is_named_with_the_valid_ones(override, guess, valid, tmp_path):
    """+module.* / +trainer.* / +callbacks.* / +logger.* keys that their class does not take: a ConfigError
    before anything is built (was a bare TypeError from instantiate, after the model and data loaded)."""
    key, value = override[1:].split("=")
    with pytest.raises(ConfigError) as info:
        _check([override], tmp_path)
    assert [p.key for p in info.value.problems] == [key], str(info.value)
    msg = str(info.value)
    assert msg.startswith(f"{key}={value}: not an argument of ") and f"did you mean {guess}?" in msg, msg
    assert valid in msg, msg


def test_every_failure_is_reported_together(tmp_path):
    bad = ["trainer.max_steps=abc", "module.lr=-1", "data.max_tokens=4", "data.val_fraction=1.0", "seed=-1",
           "data.on_error=ignore"]
    with pytest.raises(ConfigError) as info:
        _check(bad, tmp_path)
    keys = {p.key for p in info.value.problems}
    assert keys == {o.split("=")[0] for o in bad}
    assert str(info.value).startswith("6 settings are invalid:")
    for o in bad:
        assert o.split("=")[0] + "=" in str(info.value)


def test_keys_a_config_lacks_are_skipped():
    """Only the keys present are checked: a partial config (a group of your own) is never refused for lacking one.
    The max_length bound is the tokenizer's own (rmlab.data.tokenize): min_prompt_tokens + 3 special tokens + 1."""
    cfg = OmegaConf.create({"data": {"max_length": 20, "min_prompt_tokens": 16}})
    assert check_config(cfg) == []
    cfg.data.max_length = 19
    with pytest.raises(ConfigError, match=r"data.max_length=19: must be >= .* = 20"):
        check_config(cfg)
    with pytest.raises(ValueError, match="entry must be train|eval"):
        check_config(cfg, entry="score")


def test_val_fraction_zero_warns_that_no_validation_runs(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rmlab"):
        warnings = _check(["data.val_fraction=0"], tmp_path)
    assert len(warnings) == 1 and "no validation will run" in warnings[0] and "data.val_fraction=0.1" in warnings[0]
    assert "no validation will run" in caplog.text
    # Validation from elsewhere: val_fraction is not read, so neither a warning nor a range error.
    assert _check(["data=local", "data.source=x.jsonl", "data.val_source=v.jsonl", "data.val_fraction=0"], tmp_path) == []
    assert _check(["data=hh_rlhf", "+data.val_fraction=1.0"], tmp_path) == []


def test_a_top_level_key_nothing_reads_is_warned_with_the_key_it_likely_meant(tmp_path, caplog):
    """`+lr=1` trained at module.lr without a word: Hydra adds any + key, and nothing reads a top-level lr."""
    with caplog.at_level(logging.WARNING, logger="rmlab"):
        warnings = _check(["+lr=1"], tmp_path)
    assert len(warnings) == 1 and "nothing in rmlab reads a top-level `lr`" in warnings[0], warnings
    assert "Did you mean module.lr?" in warnings[0] and "Did you mean module.lr?" in caplog.text
    assert "Did you mean seed?" in _check(["+sed=1"], tmp_path)[0]
    assert "Did you mean data.max_length?" in _check(["+max_length=64", "model.name_or_path=x"], tmp_path, "eval")[0]
    assert _check(["+tags=[a]"], tmp_path) == _check(["experiment=margin"], tmp_path) == []  # keys of rmlab's own


def test_eval_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path=null: no model to evaluate: set ckpt_path="):
        _check([], tmp_path, "eval")
    with pytest.raises(ConfigError) as info:
        _check(["model.name_or_path=x", "split=train", "n_bins=0", "data.max_length=1"], tmp_path, "eval")
    assert {p.key for p in info.value.problems} == {"split", "n_bins", "data.max_length"}
    with pytest.raises(ConfigError, match="with split=val there is nothing to evaluate"):
        _check(["model.name_or_path=x", "split=val", "data.val_fraction=0"], tmp_path, "eval")
    with pytest.raises(ConfigError, match="ckpt_path=/nope.ckpt: no such file"):
        _check(["ckpt_path=/nope.ckpt"], tmp_path, "eval")
    assert _check(["model.name_or_path=x", "data.val_fraction=0"], tmp_path, "eval") == []  # split=auto: no warning


def test_broken_interpolation_is_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        _check(["experiment=grouped", "arm=both"], tmp_path)
    assert {p.key for p in info.value.problems} == {"loss.balance", "data.pair_batching"}
    assert "cannot be resolved" in str(info.value) and "arms.both" in str(info.value)


# ------------------------------------------------------------------ no false alarms
def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


REQUIRED = {"model=hf": ["model.name_or_path=Qwen/Qwen2.5-0.5B"], "data=local": ["data.source=mine.jsonl"]}


def _sweep_overrides(experiment: str) -> list[list[str]]:
    """The experiment alone, then with each value of each swept parameter (one at a time)."""
    params = OmegaConf.load(ROOT / "conf" / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    out = [[]]
    for key, values in params.items():
        out += [[f"{key}={v.strip()}"] for v in str(values).split(",")]
    return out


def test_default_config_passes(tmp_path):
    assert _check([], tmp_path) == []
    assert _check(["debug=fast"], tmp_path) == []
    for launcher in ("local", "slurm"):  # slurm.yaml adds a top-level slurm table its launcher keys read
        assert _check([f"hydra/launcher={launcher}"], tmp_path) == [], launcher


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_passes(experiment, tmp_path):
    for extra in _sweep_overrides(experiment):
        overrides = [f"experiment={experiment}", *extra]
        overrides += [o for x in extra for o in REQUIRED.get(x, [])]
        assert _check(overrides, tmp_path) == [], overrides


@pytest.mark.parametrize("group", ["model", "data", "loss", "trainer", "logger"])
def test_every_option_passes(group, tmp_path):
    for option in _options(group):
        if group == "model" and option in ("base", "scalar_base", "tiny_backbone"):
            continue  # building blocks of the model files, not options
        choice = f"{group}={option}"
        assert _check([choice, *REQUIRED.get(choice, [])], tmp_path) == [], choice
        if group == "data":  # eval reads the same data configs
            assert _check([choice, *REQUIRED.get(choice, []), "model.name_or_path=x"], tmp_path, "eval") == [], choice


# ------------------------------------------------------------------ through the command line
def _run(entry: str, args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RMLAB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, entry, *args, "threads=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    return res, time.time() - t0


@pytest.fixture(scope="module")
def startup_s() -> float:
    """Seconds to start python and import the training entry: what a failed check may cost, plus a little."""
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import rmlab.train"], cwd=ROOT, check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.time() - t0


CLI_BAD = [
    ("train.py", ["trainer.max_steps=abc"], "trainer.max_steps=abc"),
    ("train.py", ["module.lr=-1", "data.val_fraction=0"], "module.lr=-1"),
    ("train.py", ["seed=-1", "data.max_tokens=4"], "seed=-1"),
    ("eval.py", ["model.name_or_path=minilm", "n_bins=0"], "n_bins=0"),
]


@pytest.mark.parametrize("entry,args,named", CLI_BAD, ids=[f"{e} {' '.join(a)}" for e, a, _ in CLI_BAD])
def test_command_line_names_the_key_fails_fast_no_traceback(entry, args, named, tmp_path, startup_s):
    res, seconds = _run(entry, ["model=minilm", *args] if entry == "train.py" else args, tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert f"rmlab: bad config: {named}" in res.stderr or f"  {named}: " in res.stderr, res.stderr[-3000:]
    if "data.val_fraction=0" in args:
        assert "no validation will run" in out  # the warning comes out even when the run stops
    if "data.max_tokens=4" in args:
        assert "data.max_tokens=4: must be >= data.max_length" in res.stderr
    # Nothing heavy happened: no run config written, no data report, no checkpoint, no export.
    run = tmp_path / "run"
    assert not (run / "config.yaml").exists() and not (run / "data_report.json").exists()
    assert not (run / "checkpoints").exists() and not (run / "export").exists()
    assert seconds < startup_s + 30, (seconds, startup_s)


@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_a_bad_value_stops_before_lightning_and_transformers_import(entry, tmp_path):
    """The check runs first in the entry points: a typo costs python + torch (about 2 s), not the 6-8 s of
    Lightning and transformers it cost when it ran inside run(). Asserted on the import log, not a clock."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RMLAB_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-X", "importtime", entry, "data.max_length=1",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "data.max_length=1: must be >=" in res.stderr, res.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported  # the log is the real one
    assert not {"lightning", "transformers"} & imported, sorted({"lightning", "transformers"} & imported)


def test_a_config_warning_is_said_once(tmp_path):
    """train.py checks the config before the heavy imports and run() checks it again (its callers are not only
    train.py): the warnings are logged by run(), once, not by both."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RMLAB_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "train.py", "debug=fast", "threads=1", "data.val_fraction=0",
                          "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("no prompt is held out") == 1, out[-3000:]
    assert (tmp_path / "run" / "train.log").read_text().count("no prompt is held out") == 1


def test_no_training_groups_left_is_a_data_error_pointing_at_the_report(tmp_path):
    import json

    from rmlab.data.datamodule import build_datamodule
    from rmlab.data.sources import DataError
    from rmlab.models import build_tokenizer

    src = tmp_path / "all_bad.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a"}) + "\n" for i in range(3)))
    dm = build_datamodule(tokenizer=build_tokenizer("byt5", None), source=str(src), on_error="skip", cache=False,
                         output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "no training groups left" in msg and f"data.source={src}" in msg
    assert f"read the data report at {tmp_path / 'run' / 'data_report.json'}" in msg
    assert "bad_record: missing field 'rejected'" in msg  # the drop reason
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["records"]["kept"] == 0


def test_a_missing_source_under_on_error_skip_says_file_not_found(tmp_path):
    """data=pandalm sets on_error: skip; run from outside the repo, ${paths.data_dir} points nowhere. That is a wrong
    path, not 'no training groups left' with a 'bad_record: file not found' drop count to decode."""
    from rmlab.data.datamodule import build_datamodule
    from rmlab.data.sources import DataError
    from rmlab.models import build_tokenizer

    for src in (tmp_path / "shared" / "data" / "pandalm" / "testset-v1.jsonl", tmp_path / "shared/data/x" / "*.jsonl",
                tmp_path / "mine" / "prefs.jsonl"):
        dm = build_datamodule(tokenizer=build_tokenizer("byt5", None), source=str(src), on_error="skip", cache=False,
                             output_dir=str(tmp_path / "run"))
        with pytest.raises(DataError) as info:
            dm.setup("fit")
        msg = str(info.value)
        first = "file not found" if "*" not in str(src) else "no file matches the pattern"
        assert msg.startswith(f"data.source={src}: {first}: nothing was read") and "read the data report" not in msg
        if "shared" in str(src):  # one of the real sets: where they are looked for
            assert "paths.data_dir" in msg and "RMLAB_DATA_DIR" in msg
        else:  # the user's own file: no word about the shared sets, the working dir instead
            assert "shared/data" not in msg and f"the directory you ran the command in ({Path.cwd()})" in msg
    from rmlab.data.sources import read_records

    ((_, err),) = read_records("no-such-file-rmlab.jsonl")  # relative paths follow the working dir (hydra.job.chdir: false)
    assert isinstance(err, DataError) and "the directory you ran the command in" in err.hint
    # a source that was read and whose every record was bad keeps the report-pointing message
    bad = tmp_path / "all_bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    dm = build_datamodule(tokenizer=build_tokenizer("byt5", None), source=str(bad), on_error="skip", cache=False,
                         output_dir=str(tmp_path / "run2"))
    with pytest.raises(DataError, match="no training groups left"):
        dm.setup("fit")


def test_max_tokens_auto_is_accepted_and_sized(tmp_path):
    """data.max_tokens=auto passes the check; on CPU it is 8 rows of data.max_length (no probe: no device memory
    to fill), on a GPU a memory probe sizes it (rmlab.models.budget)."""
    from rmlab.models import build_model
    from rmlab.models.budget import CPU_ROWS, token_budget
    from rmlab.validate import check_config
    from tests.conftest import TINY_LLAMA, compose

    cfg = compose(["model=tiny_llama", "data.max_tokens=auto"], tmp_path)
    check_config(cfg)  # raises on a refused value
    bad = compose(["model=tiny_llama", "data.max_tokens=lots"], tmp_path)
    with pytest.raises(Exception, match="data.max_tokens"):
        check_config(bad)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5")
    assert token_budget(model, 300, device="cpu") == CPU_ROWS * 300
