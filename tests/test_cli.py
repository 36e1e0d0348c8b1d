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
