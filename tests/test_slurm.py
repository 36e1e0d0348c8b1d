"""SLURM through submitit (`hydra/launcher=slurm`): the launcher resolves to whole numbers for every trainer, one
requeue mechanism (submitit's, on SIGUSR2; Lightning's off), and a requeued job resumes from periodic checkpoints.
No cluster here: what runs is the config, the sbatch text submitit would write, and the rmlab side of a job."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose


def _launcher(overrides: list[str], tmp_path: Path) -> tuple[dict, object]:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hcompose(config_name="train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True), cfg


@pytest.mark.parametrize(
    "overrides,env,expected",
    [
        (["trainer=ddp"], None, (1, 1, 1)),  # devices=auto: 1 task + 1 GPU per node unless the cluster says more
        (["trainer=ddp"], "8", (1, 8, 8)),
        (["trainer=ddp", "trainer.devices=4"], "8", (1, 4, 4)),  # an explicit count wins
        (["trainer=fsdp", "trainer.num_nodes=2"], None, (2, 1, 1)),
        (["trainer=deepspeed"], None, (1, 1, 1)),
        (["trainer=gpu"], None, (1, 1, 1)),
        (["trainer=cpu"], None, (1, 1, 0)),  # CPU trainers ask for no GPU
        (["trainer=ddp_cpu"], None, (1, 2, 0)),
    ],
)
def test_slurm_launcher_resolves_to_whole_numbers(overrides, env, expected, tmp_path, monkeypatch):
    if env is None:
        monkeypatch.delenv("RMLAB_SLURM_GPUS_PER_NODE", raising=False)
    else:
        monkeypatch.setenv("RMLAB_SLURM_GPUS_PER_NODE", env)
    launcher, cfg = _launcher(overrides, tmp_path)
    got = (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"])
    assert got == expected and all(type(v) is int for v in got), got
    assert "auto" not in repr(launcher)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["max_num_timeout"] > 0
    # Every job gets the resume defaults; the job config itself still leaves both keys unset (so they win if set).
    assert dict(cfg.hydra.job.env_set) == {"RMLAB_DEFAULT_CKPT_PATH": "last", "RMLAB_DEFAULT_CKPT_EVERY_N_STEPS": "500"}
    assert cfg.ckpt_path is None and cfg.callbacks.model_checkpoint.every_n_train_steps is None


def test_sbatch_asks_for_submitits_signal_and_marks_the_job(tmp_path, monkeypatch):
    from submitit.core.job_environment import JobEnvironment
    from submitit.slurm.slurm import _make_sbatch_string

    monkeypatch.delenv("RMLAB_SLURM_GPUS_PER_NODE", raising=False)
    launcher, _ = _launcher(["trainer=ddp", "trainer.devices=4"], tmp_path)
    text = _make_sbatch_string(
        command="python -m submitit.core._submit",
        folder=tmp_path,
        nodes=launcher["nodes"],
        ntasks_per_node=launcher["tasks_per_node"],
        gpus_per_node=launcher["gpus_per_node"],
        signal_delay_s=launcher["signal_delay_s"],
    )
    assert JobEnvironment.USR_SIG == "USR2"  # submitit's preemption signal (SUBMITIT_PREEMPT_SIGNAL unset)
    assert (
        "#SBATCH --signal=USR2@120" in text
        and "#SBATCH --ntasks-per-node=4" in text
        and "#SBATCH --gpus-per-node=4" in text
    )
    assert "export SUBMITIT_EXECUTOR=slurm" in text  # what rmlab.checkpoint.under_submitit_slurm reads


def test_submitits_requeue_reruns_the_same_job():
    """hydra-submitit-launcher's checkpoint(): the requeued job calls the launcher again with the same overrides and
    job number, so it composes the same config and run dir; ckpt_path=last (the launcher's default) resumes there."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    launcher = SlurmLauncher(timeout_min=1)
    args = (["loss=bt", "seed=1"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    again = launcher.checkpoint(*args)
    assert again.function is launcher and again.args == args


def test_plugins_turn_lightnings_requeue_off_under_submitit(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from rmlab.checkpoint import AtomicCheckpointIO, checkpoint_plugins

    ddp = OmegaConf.create({"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}})
    deepspeed = OmegaConf.create({"strategy": {"_target_": "lightning.pytorch.strategies.DeepSpeedStrategy"}})
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert [type(p) for p in checkpoint_plugins(ddp)] == [AtomicCheckpointIO]
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    plugins = checkpoint_plugins(ddp)
    assert [type(p) for p in plugins] == [AtomicCheckpointIO, SLURMEnvironment] and plugins[1].auto_requeue is False
    assert [type(p) for p in checkpoint_plugins(deepspeed)] == [SLURMEnvironment]  # DeepSpeed writes its own files
    assert checkpoint_plugins(OmegaConf.create({"plugins": ["x"]})) == []  # the config's own plugins win


def test_lightning_leaves_submitits_signal_alone(monkeypatch):
    """In a SLURM job with rmlab's plugin, Lightning registers no requeue handler: SIGUSR2 stays submitit's."""
    import lightning as L

    from rmlab.checkpoint import checkpoint_plugins

    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "42",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1",
             "SUBMITIT_EXECUTOR": "slurm"}  # fmt: skip
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, logger=False, plugins=checkpoint_plugins(OmegaConf.create({})),
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )  # fmt: skip
        env = trainer._accelerator_connector.cluster_environment
        assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False
        trainer._signal_connector.register_signal_handlers()
        try:
            assert signal.getsignal(signal.SIGUSR2) is submitit_handler
            assert signal.getsignal(signal.SIGUSR1) == before[signal.SIGUSR1]  # no Lightning requeue handler
        finally:
            trainer._signal_connector.teardown()
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_resume_defaults_from_the_launcher_environment(tmp_path, monkeypatch):
    import torch

    from rmlab.checkpoint import resolve_ckpt_path

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"state_dict": {}}, last)  # `last` takes only a loadable checkpoint
    monkeypatch.delenv("RMLAB_DEFAULT_CKPT_PATH", raising=False)
    assert resolve_ckpt_path(None, tmp_path) is None  # outside the SLURM launcher: a fresh start unless asked
    monkeypatch.setenv("RMLAB_DEFAULT_CKPT_PATH", "last")
    assert resolve_ckpt_path(None, tmp_path) == str(last)  # a requeued job resumes
    assert resolve_ckpt_path(None, tmp_path / "fresh") is None  # the first launch starts fresh
    assert resolve_ckpt_path("/x/y.ckpt", tmp_path) == "/x/y.ckpt"  # an explicit ckpt_path wins


def test_periodic_checkpoints_default_from_the_launcher_environment(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from rmlab.checkpoint import default_checkpoint_interval
    from rmlab.train import run

    unset, explicit, timed = (
        ModelCheckpoint(),
        ModelCheckpoint(every_n_train_steps=7),
        ModelCheckpoint(train_time_interval=__import__("datetime").timedelta(minutes=5)),
    )
    trainer = SimpleNamespace(checkpoint_callbacks=[unset, explicit, timed])
    monkeypatch.delenv("RMLAB_DEFAULT_CKPT_EVERY_N_STEPS", raising=False)
    assert default_checkpoint_interval(trainer) is None and unset._every_n_train_steps == 0
    monkeypatch.setenv("RMLAB_DEFAULT_CKPT_EVERY_N_STEPS", "500")
    assert default_checkpoint_interval(trainer) == 500
    assert (unset._every_n_train_steps, explicit._every_n_train_steps, timed._every_n_train_steps) == (500, 7, 0)

    # A whole run, as a job of hydra/launcher=slurm sees it: checkpoints every N steps with no override.
    monkeypatch.setenv("RMLAB_DEFAULT_CKPT_EVERY_N_STEPS", "2")
    monkeypatch.setenv("RMLAB_DEFAULT_CKPT_PATH", "last")
    overrides = ["model=tiny_llama", "data.simulator.num_prompts=60", "trainer.max_steps=4", "threads=1",
                 "~callbacks.progress_bar", "export=false"]  # fmt: skip
    run(compose(overrides, tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step2.ckpt", "step4.ckpt"]
