"""Exact resume under a finite ``max_epochs`` (the default is 1): killed mid-epoch, at an epoch boundary, in the
validation between epochs, several times over, on one process and under DDP. Each ends with the weights of the
run that never stopped and every step logged exactly once.

The bug these pin down: with a finite ``max_epochs`` the LR schedule asks for ``estimated_stepping_batches``,
which builds the training loader before the checkpoint is restored, and Lightning then never handed the
sampler's position back: a resumed epoch started over from its first batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose
from tests.test_resume import _csv_by_step as _csv

# 10 batches an epoch of a tiny Llama with dropout on, a checkpoint every 5 steps. forward_mode=padded: the
# default prefix-shared forward of a causal LM draws no dropout masks, and the RNG state must matter here.
BASE = [
    "model=tiny_llama",
    "model.dropout=0.1",
    "model.forward_mode=padded",
    "data.simulator.num_prompts=80",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "callbacks.model_checkpoint.every_n_train_steps=5",
    "export=false",
    "threads=1",
]


def _popen(args: list[str], run_dir: Path, kill: str | None = None) -> subprocess.Popen:
    """``python train.py`` in a subprocess, resuming from the run dir when it has a checkpoint. ``kill``:
    ``step:N`` (SIGKILL before optimizer step N+1) or ``val:N`` (SIGKILL in the validation after step N)."""
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    if kill:
        where, n = kill.split(":")
        target = {"step": "tests.faults.KillAtStep", "val": "tests.faults.KillInValidation"}[where]
        cmd += [f"+callbacks.kill._target_={target}", f"+callbacks.kill.step={n}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, killed: bool, timeout: int = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == (-9 if killed else 0), out[-4000:]
    return out


def _assert_same_run(full: Path, resumed: Path, steps: int) -> None:
    a = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"], (a["global_step"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)
    loader = "combined_loader"
    assert b["loops"]["fit_loop"]["state_dict"][loader] == a["loops"]["fit_loop"]["state_dict"][loader]
    # Every step logged exactly once, with the uninterrupted run's value; validation rows likewise.
    for key in ("train/loss_step", "train/acc_step", "val/acc"):
        want, got = _csv(full / "csv" / "metrics.csv", key), _csv(resumed / "csv" / "metrics.csv", key)
        assert sorted(got) == sorted(want), (key, sorted(got), sorted(want))
        assert all(len(v) == 1 for v in got.values()), (key, {s: v for s, v in got.items() if len(v) > 1})
        for s, v in want.items():
            assert got[s][0] == pytest.approx(v[0], abs=1e-6), (key, s)
    assert sorted(_csv(resumed / "csv" / "metrics.csv", "train/loss_step")) == list(range(steps))


@pytest.mark.slow
def test_max_epochs_1_killed_mid_epoch_resumes_exactly(tmp_path):
    """The default epoch setting (max_epochs=1, no max_steps): killed at step 7, resumed from step 5."""
    from rmlab.train import run

    killed = tmp_path / "killed"
    proc = _popen(BASE, killed, kill="step:7")
    try:
        run(compose(BASE, tmp_path / "full"))  # the uninterrupted run, here, meanwhile
    finally:
        _finish(proc, killed=True)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    _finish(_popen(BASE, killed), killed=False)
    _assert_same_run(tmp_path / "full", killed, steps=10)


@pytest.mark.slow
def test_max_epochs_3_three_kills_mid_epoch_at_a_boundary_and_in_validation(tmp_path):
    """30 steps over 3 epochs, killed three times: mid-epoch (step 7, resumes from 5), just after an epoch
    boundary (step 13, resumes from the step-10 checkpoint that closed epoch 0), and in the validation after
    epoch 1 (resumes from the step-20 checkpoint written before that validation). The fourth launch finishes."""
    from rmlab.train import run

    args = [*BASE, "trainer.max_epochs=3"]
    killed = tmp_path / "killed"
    proc = _popen(args, killed, kill="step:7")
    try:
        run(compose(args, tmp_path / "full"))
    finally:
        _finish(proc, killed=True)
    resumed_from = []
    for kill in ("step:13", "val:20"):
        resumed_from.append(torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"])
        _finish(_popen(args, killed, kill=kill), killed=True)
    resumed_from.append(torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"])
    assert resumed_from == [5, 10, 20]
    _finish(_popen(args, killed), killed=False)
    _assert_same_run(tmp_path / "full", killed, steps=30)


@pytest.mark.slow
def test_ddp_killed_mid_epoch_resumes_exactly(tmp_path):
    """trainer=ddp_cpu (2 processes, gloo), max_epochs=2: both ranks killed at step 7, resumed from step 5, each
    rank with its own RNG states (the checkpoint holds every rank's)."""
    args = [
        *BASE,
        "trainer=ddp_cpu",
        "data.simulator.num_prompts=120",
        "trainer.max_epochs=2",
        "+callbacks.skew._target_=tests.faults.RankSkewedRng",  # each rank its own RNG stream, as on GPUs
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _finish(_popen(args, full), killed=False)
    # Every rank runs the kill callback, so both die at the same step (as when the node goes).
    _finish(_popen(args, killed, kill="step:7"), killed=True)
    five = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert five["global_step"] == 5 and len(five["rmlab_rng_by_rank"]) == 2
    assert not torch.equal(five["rmlab_rng_by_rank"][0]["torch"], five["rmlab_rng_by_rank"][1]["torch"])
    _finish(_popen(args, killed), killed=False)
    steps = len(_csv(full / "csv" / "metrics.csv", "train/loss_step"))
    assert steps >= 10  # two epochs of at least 5 steps, so the kill at 7 is past the first epoch's checkpoints
    _assert_same_run(full, killed, steps=steps)


@pytest.mark.slow
def test_a_run_stopped_by_max_steps_extends_within_its_epoch_exactly(tmp_path):
    """A run that ended at max_steps=3 inside its only epoch (the default max_epochs=1), resumed with
    max_steps=7 and ckpt_path=last: it trained nothing before ("max_epochs=1 reached": Lightning counts an epoch
    cut by max_steps as processed). It continues that epoch from batch 4 and ends with the weights, loader
    position and logged steps of a run that went to step 7 at once (constant lr, so the schedule, which is
    sized from max_steps, is the same in both)."""
    from rmlab.train import run

    args = [*BASE, "module.scheduler=constant", "module.warmup_ratio=0"]
    run(compose([*args, "trainer.max_steps=7"], tmp_path / "full"))
    run(compose([*args, "trainer.max_steps=3"], tmp_path / "ext"))
    summary = run(compose([*args, "trainer.max_steps=7", "ckpt_path=last"], tmp_path / "ext"))
    assert summary["train_steps"] == 7
    _assert_same_run(tmp_path / "full", tmp_path / "ext", steps=7)
