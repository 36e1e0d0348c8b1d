"""The command line on bad input: a clear message naming the file, line and field, no traceback, and a
wandb run (offline, no key, no prompt) that is finished even though the run failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_bad_input_is_a_message_not_a_traceback(entry, tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text(
        json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "x", "chosen": "a"})
        + "\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true", RMLAB_CACHE=str(tmp_path / "cache"))
    args = ["model=tiny_llama", "data=local", f"data.source={bad}", "threads=1", f"hydra.run.dir={tmp_path / 'run'}"]
    if entry == "train.py":
        args.append("logger=wandb")  # no key: offline, and finished even though the run fails
    res = subprocess.run(
        [sys.executable, entry, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-2000:]  # the bad-input exit, not a crash (a signal or an uncaught error)
    assert f"rmlab: bad input: {bad}:2" in out and "data.fields.rejected" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    if entry == "train.py":
        log = next((tmp_path / "run" / "wandb").glob("debug.log")).read_text()
        assert "finishing run" in log and "got exitcode: 1" in log  # wandb.finish ran, with the failure's exit code


def test_a_run_prints_each_line_once(tmp_path):
    """Under Hydra's logging Lightning printed every message twice (its own "INFO: ..." handler and Hydra's
    line) and warned about its own LeafSpec use at every run."""
    env = dict(os.environ, RMLAB_CACHE=str(tmp_path / "cache"))
    res = subprocess.run(
        [sys.executable, "train.py", "debug=fast", "threads=1", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("`Trainer.fit` stopped") == 1, out[-3000:]
    assert "INFO: " not in out and "LeafSpec" not in out, out[-3000:]
    assert "`Trainer.fit` stopped" in (tmp_path / "run" / "train.log").read_text()  # still in the job's log


@pytest.mark.parametrize(
    "entry, override, guess, listed",
    [
        ("train.py", "model.poolng=last", "model.pooling", "name_or_path, pooling"),
        ("train.py", "module.lrr=1e-5", "module.lr", "lr, min_lr_ratio"),
        ("eval.py", "data.simulator.num_prompt=3", "data.simulator.num_prompts", "k_max, num_prompts"),
    ],
)
def test_a_misspelled_key_names_the_valid_keys(entry, override, guess, listed, tmp_path):
    """Hydra refuses a key the config lacks before rmlab runs ("Key 'poolng' is not in struct", and the advice
    to append it with +); the command line then names the closest key and every key of that node."""
    res = subprocess.run(
        [sys.executable, entry, override, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    key = override.split("=")[0]
    assert f"rmlab: {key} is not a key of {key.rsplit('.', 1)[0]} (did you mean {guess}?)" in res.stderr, res.stderr
    assert listed in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()  # refused before a run dir was made


def test_unknown_keys_walks_to_the_deepest_node_that_exists():
    from rmlab.overrides import unknown_keys

    cfg = {"model": {"pooling": "last", "lora": {"r": 0}}, "seed": 0, "paths": {"x": "${oc.env:HOME}"}}
    over = ["model=tiny_llama", "+model.extra=1", "model.pooling=mean", "model.lora.rr=8", "sede.x=1", "seed.y=2"]
    lines = unknown_keys(cfg, over)
    assert len(lines) == 2, lines  # group choices, +keys, existing keys and a key below a value are not this error
    assert lines[0].startswith("rmlab: model.lora.rr is not a key of model.lora (did you mean model.lora.r?); its keys: r.")
    assert lines[1].startswith("rmlab: sede.x is not a key of the top level (did you mean seed?); its keys: model, paths, seed.")
    groups = {"model": frozenset({"minilm", "tiny_llama"}), "loss": frozenset({"bt"})}
    lines = unknown_keys(cfg, ["loss=bt", "modle=tiny_llama", "pooling=mean", "seed=1", "sedd=1"], groups)
    assert [line.split(";")[0] for line in lines] == [
        "rmlab: modle is not a key of the top level (did you mean model=tiny_llama?)",  # a group's option
        "rmlab: pooling is not a key of the top level (did you mean model.pooling?)",  # a group's key, unqualified
        "rmlab: sedd is not a key of the top level (did you mean seed?)",
    ]


def test_a_misspelled_key_in_a_sweep_over_a_group_is_named_too():
    """``-m model=tiny_llama,minilm model.poolng=last``: the config is composed again with the group choices to find
    the valid keys; a sweep's comma list there made that fail and the hint was dropped (the first option is used)."""
    from rmlab.overrides import name_unknown_keys

    argv = ["-m", "model=tiny_llama,minilm", "loss=bt", "model.poolng=last", "seed=0,1"]
    lines = name_unknown_keys(ROOT / "conf", "train", argv)
    assert len(lines) == 1 and lines[0].startswith("rmlab: model.poolng is not a key of model (did you mean model.pooling?)"), lines


@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_help_says_what_to_run_then_lists_the_groups(entry, tmp_path):
    """`--help` leads with the entry's purpose and runnable examples (Hydra's bare help began 'train is powered by
    Hydra.'), then Hydra's groups and the composed config; nothing is run and no run dir is made."""
    res = subprocess.run([sys.executable, entry, "--help", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert out.startswith(f"rmlab {entry}: ") and "powered by Hydra" not in out, out[:500]
    examples = [line.strip() for line in out.splitlines() if line.startswith(f"  python {entry} ")]
    assert len(examples) >= 3, out[:1500]
    groups = out.index("== Configuration groups ==")
    assert out.index("Examples:") < groups < out.index("== Config ==") < out.index("A misspelled key is refused")
    assert "loss: answer_ce, attributes, bt," in out and "\nseed: 0\n" in out
    assert not (tmp_path / "run").exists()


def test_next_lines_name_the_python_that_has_rmlab(tmp_path):
    """`make train` runs .venv/bin/python without activating the venv: the summary's `next: python eval.py ...`
    then started the system's python, without rmlab's packages. The next: lines name `python` only when that is
    this interpreter's; else its path (relative to the working dir), and that command runs as printed."""
    import shlex

    code = ("from rmlab.summary import format_summary; print(format_summary({'run_dir': 'R', 'val_acc': 0.5, "
            "'oracle_acc': None, 'length_acc': None, 'train_steps': 1, 'minutes': 0.1, 'export_dir': 'R/export', "
            "'wandb_offline': 'R/wandb/offline-run-1'}))")
    bindir = os.path.dirname(sys.executable)

    def printed(path: str) -> list[str]:
        env = {**os.environ, "PATH": path}
        env.pop("VIRTUAL_ENV", None)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout
        return [x.strip() for x in out.splitlines() if "eval.py" in x or "rmlab.score" in x or "sync" in x]

    active = printed(f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")  # an activated venv: its bin first
    assert active[0].startswith("next: python eval.py ckpt_path=R/checkpoints/last.ckpt"), active
    assert active[1].startswith("python -m rmlab.score <file.jsonl>") and "with  wandb sync R/" in active[2]
    bare = printed(f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin")  # make train: the venv's bin not on PATH
    py = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    assert bare[0].startswith(f"next: {shlex.quote(py)} eval.py ckpt_path="), bare
    assert bare[1].startswith(f"{shlex.quote(py)} -m rmlab.score ") and f"{shlex.quote(py)} -m wandb sync R/" in bare[2]
    # ... and that interpreter has rmlab and wandb: the printed commands start
    for module in ("rmlab.score", "wandb"):
        res = subprocess.run(f"{shlex.quote(py)} -m {module} --help", shell=True, cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PATH": f"/usr/bin{os.pathsep}/bin"}, timeout=120)
        assert res.returncode == 0, res.stderr[-1500:]
