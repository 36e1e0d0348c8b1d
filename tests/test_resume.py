"""Exact resume after SIGKILL, atomic checkpoint files, the NaN guard, gradient-norm logging, wandb run ids."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose

# 30 steps over 3 epochs of 10 batches of a tiny Llama, with dropout on so the RNG state matters. The kill at
# step 12 falls in the second epoch; the step-10 checkpoint it resumes from closes the first.
RUN = [
    "model=tiny_llama",
    "model.dropout=0.1",
    "data.simulator.num_prompts=80",
    "trainer.max_steps=30",
    "trainer.max_epochs=-1",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "callbacks.model_checkpoint.every_n_train_steps=5",
    "export=false",
    "threads=1",
]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _csv_by_step(path: Path, key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                out.setdefault(int(row["step"]), []).append(float(row[key]))
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    from rmlab.train import run

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "train.py",
        *RUN,
        f"hydra.run.dir={killed}",
        "+callbacks.kill._target_=tests.faults.KillAtStep",
        "+callbacks.kill.step=12",
    ]
    # The run to be killed goes in a subprocess, the uninterrupted one here meanwhile (one thread each).
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        full = tmp_path / "full"
        run(compose(RUN, full))
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == -9, out[-3000:]

    # The kill left the step-10 checkpoint whole and no temp files behind.
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step10.ckpt", "step5.ckpt"], ckpts
    assert _state(killed / "checkpoints" / "last.ckpt")["global_step"] == 10
    ten = _state(killed / "checkpoints" / "step10.ckpt")
    assert ten["loops"]["fit_loop"]["state_dict"]["combined_loader"][0] | {"seed": 0} == {
        "epoch": 0,
        "consumed": 10,
        "seed": 0,
        "num_replicas": 1,
    }  # the resume point is an epoch's end
    before = ten["state_dict"]
    for k, v in _state(full / "checkpoints" / "step10.ckpt")["state_dict"].items():
        # Tells a resume bug from a run that diverged before the kill (e.g. the code changed under the test).
        torch.testing.assert_close(before[k], v, atol=1e-6, rtol=0, msg=f"diverged before the kill: {k}")

    run(compose([*RUN, "ckpt_path=last"], killed))

    a, b = _state(full / "checkpoints" / "last.ckpt"), _state(killed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 30
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)
    # The scheduler continued where it stopped, and the sampler's position came back with the loader.
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 30
    loader = b["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == a["loops"]["fit_loop"]["state_dict"]["combined_loader"] and loader[0]["epoch"] >= 2, loader

    # Logged steps continue without duplicates (rows logged after step 10 by the killed run were dropped and
    # logged again), and each logged value equals the uninterrupted run's.
    for key in ("train/loss_step", "train/grad_norm"):
        full_log, resumed_log = (
            _csv_by_step(full / "csv" / "metrics.csv", key),
            _csv_by_step(killed / "csv" / "metrics.csv", key),
        )
        assert sorted(resumed_log) == sorted(full_log) == list(range(30)), (key, sorted(resumed_log))
        assert all(len(v) == 1 for v in resumed_log.values()), key
        for s, v in full_log.items():
            assert resumed_log[s][0] == pytest.approx(v[0], abs=1e-6), (key, s)
    grad = [v[0] for v in full_log.values()]
    assert all(0 < g < float("inf") for g in grad) and len(set(grad)) > 20  # a real, varying pre-clip norm


@pytest.mark.slow
def test_nonfinite_reward_stops_with_step_and_prompt_ids(tmp_path):
    from rmlab.train import run

    record = tmp_path / "poison.json"
    cfg = compose(
        [
            *RUN,
            "trainer.max_steps=10",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "model.dropout=false",
            "+callbacks.poison._target_=tests.faults.PoisonAtStep",
            "+callbacks.poison.step=5",
            f"+callbacks.poison.record={record}",
        ],
        tmp_path / "run",
    )
    with pytest.raises(FloatingPointError) as err:
        run(cfg)
    seen = json.loads(record.read_text())
    msg = str(err.value)
    assert "at global step 5" in msg and all(str(g) in msg for g in seen["group_ids"][:32]), msg

    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "last.ckpt",
        "nonfinite-step5.ckpt",
        "step2.ckpt",
        "step4.ckpt",
    ]
    last = ckpt_dir / "last.ckpt"  # the last good checkpoint: step 4, byte for byte as before the NaN
    assert hashlib.sha256(last.read_bytes()).hexdigest() == seen["last_sha"]
    assert _state(last)["global_step"] == 4
    bad = _state(ckpt_dir / "nonfinite-step5.ckpt")
    assert bad["nonfinite"]["group_ids"] == seen["group_ids"] and bad["nonfinite"]["global_step"] == 5
    assert torch.isnan(bad["state_dict"]["model.hf.score.weight"]).all()  # the state that produced the NaN


def test_atomic_save_keeps_old_file_when_write_dies(tmp_path, monkeypatch):
    import rmlab.checkpoint as ck

    path = tmp_path / "last.ckpt"
    ck.atomic_torch_save({"step": 1}, path)
    old = path.read_bytes()

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", dies_midway)
    with pytest.raises(OSError):
        ck.atomic_torch_save({"step": 2}, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_ckpt_path_last_resolves_in_the_run_dir(tmp_path):
    from rmlab.checkpoint import resolve_ckpt_path

    assert resolve_ckpt_path("last", tmp_path) is None  # nothing yet: a fresh start, same command
    assert resolve_ckpt_path("/x/y.ckpt", tmp_path) == "/x/y.ckpt"
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_3.ckpt"
    torch.save({"state_dict": {}}, last)  # `last` takes only a loadable checkpoint (tests/test_broken_files.py)
    assert resolve_ckpt_path("last", tmp_path) == str(last)
    torch.save({"state_dict": {}}, hpc)
    os.utime(hpc, (time.time() + 5, time.time() + 5))  # SLURM's pre-emption checkpoint is newer
    assert resolve_ckpt_path("last", tmp_path) == str(hpc)


def test_rng_round_trip_through_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from rmlab.checkpoint import atomic_torch_save, capture_rng, restore_rng

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    atomic_torch_save(capture_rng(), tmp_path / "rng.pt")
    expect = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    import wandb

    from rmlab.runtime import build_loggers

    ids = []
    for _ in range(2):  # the first launch, then the resumed one in the same run dir
        cfg = compose(["logger=wandb", "logger.wandb.offline=true"], tmp_path)
        lg = [x for x in build_loggers(cfg) if type(x).__name__ == "WandbLogger"][0]
        ids.append(lg.experiment.id)
        wandb.finish()
    assert ids[0] == ids[1] == (tmp_path / "wandb_id").read_text().strip()


def _module_with_grads():
    from rmlab.losses import BTLoss
    from rmlab.module import RewardModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    module = RewardModule(model=net, loss=BTLoss())
    net(torch.randn(7, 6)).pow(2).sum().backward()
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    return module, net, logged


def test_grad_norm_is_the_total_norm_before_clipping():
    from types import SimpleNamespace

    from rmlab.callbacks import GradNormMonitor

    monitor = GradNormMonitor()
    module, net, logged = _module_with_grads()
    grads = [p.grad.clone() for p in net.parameters()]
    # One process (and DDP, whose gradients are already whole on each rank): the local total norm.
    expected = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()], 2.0)
    monitor.on_before_optimizer_step(None, module, None)
    assert float(logged["train/grad_norm"]) == pytest.approx(float(expected), rel=1e-6)
    for p, g in zip(net.parameters(), grads):
        assert torch.equal(p.grad, g)  # reading the norm clips nothing

    # Sharded gradients (FSDP): the norm comes from the wrapper's all-reduced clip_grad_norm_ with an infinite
    # max norm, not from this rank's shard; DeepSpeed ZeRO keeps no p.grad to read, so nothing is logged.
    calls = []

    class Wrapped:
        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)
            return torch.tensor(7.5)

    logged.clear()
    monitor.on_before_optimizer_step(SimpleNamespace(model=Wrapped(), strategy=None), module, None)
    assert calls == [float("inf")] and float(logged["train/grad_norm"]) == 7.5

    class DeepSpeedStrategy:
        config = {"zero_optimization": {"stage": 2}}

    logged.clear()
    monitor.on_before_optimizer_step(SimpleNamespace(model=net, strategy=DeepSpeedStrategy()), module, None)
    assert "train/grad_norm" not in logged
