"""Sweeps: every experiment recipe runs, submitit_local really launches jobs, Optuna runs trials."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Small and fast: the recipes' logic (overrides, interpolations, sweeps) is what is smoke-tested.
TINY = ["model=tiny_llama", "data.simulator.num_prompts=60", "export=false", "threads=1"]


def _train(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _runs(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.rglob("metrics.json"))]


@pytest.mark.slow
def test_every_experiment_config_runs(tmp_path):
    names = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert {"bt_vs_logexp", "margin", "grouped", "epochs", "kwise", "heads"} <= set(names)
    # Each recipe keeps its own data (the simulator sizes, AlpacaEval 2): only the model is shrunk.
    small = ["model=tiny_llama", "export=false", "threads=1", "+trainer.limit_val_batches=4"]
    _train(["-m", "experiment=glob(*)", "trainer.max_steps=5", "trainer.max_epochs=1", *small, f"hydra.sweep.dir={tmp_path}"])
    runs = _runs(tmp_path)
    assert len(runs) == len(names)  # one job per recipe (each recipe's own seeds are for a real -m run)
    assert all(r["train_steps"] == 5 for r in runs)
    for r in runs:  # a number (not NaN, not null), an accuracy, and the logged val/acc itself
        assert isinstance(r["val_acc"], float) and math.isfinite(r["val_acc"]), r
        assert 0.0 <= r["val_acc"] <= 1.0 and r["val_acc"] == r["metrics"]["val/acc"], r


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(tmp_path):
    _train(["-m", "hydra/launcher=local", "loss=bt,logexp", "trainer.max_steps=3", *TINY, f"hydra.sweep.dir={tmp_path}"])
    runs = _runs(tmp_path)
    assert len(runs) == 2 and all(r["train_steps"] == 3 for r in runs)
    # submitit really ran them: each job left its submission and result files.
    assert len(list((tmp_path / ".submitit").rglob("*_result.pkl"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_optuna_two_trials(tmp_path, storage):
    args = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=3", *TINY, f"hydra.sweep.dir={tmp_path}"]
    db = tmp_path / "optuna.db"
    if storage == "sqlite":
        args.append(f"hydra.sweeper.storage=sqlite:///{db}")
    _train(args)
    runs = _runs(tmp_path)
    assert len(runs) == 2
    import yaml

    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(r["val_acc"] for r in runs))
    if storage == "sqlite":
        import optuna

        study = optuna.load_study(study_name="rmlab", storage=f"sqlite:///{db}")
        assert len(study.trials) == 2
        assert {"module.lr", "loss", "margin_scale"} <= {k.lstrip("+") for k in study.trials[0].params}


@pytest.mark.slow
def test_wandb_runs_of_a_sweep_share_a_group_and_are_named_by_overrides(tmp_path):
    sweep = tmp_path / "sweepA"
    _train(["-m", "logger=wandb", "loss=bt,logexp", "trainer.max_steps=2", *TINY, f"hydra.sweep.dir={sweep}"])
    files = sorted(sweep.rglob("run-*.wandb"))
    assert len(files) == 2  # offline runs: no key, no prompt, no network
    for f in files:
        blob = f.read_bytes()
        assert b"train/sweepA" in blob  # group = <task_name>/<sweep dir>
        job = f.parents[2].name.split("_", 1)[1]  # the run dir's override string
        assert job.encode() in blob and (b"loss=bt" in blob or b"loss=logexp" in blob)
