"""One run per directory: default run dirs are unique per process, an explicit dir is locked while its run
lives, and a dead run's lock never blocks the resume."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _steps(metrics: Path) -> list[int]:
    with open(metrics, newline="") as f:
        return sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step"))


@pytest.mark.parametrize("conf", ["train", "eval"])
def test_default_run_dir_gets_a_per_process_suffix(conf):
    """The same clock second in two processes still gives two names; one process always gets the same one."""
    code = (
        "import rmlab; from omegaconf import OmegaConf;"
        "OmegaConf.register_new_resolver('now', lambda p: 'SAME-SECOND');"
        f"c = OmegaConf.load('conf/{conf}.yaml');"
        "d = OmegaConf.create({'task_name': c.task_name, 'hydra': {'run': c.hydra.run}});"
        "print(d.hydra.run.dir, d.hydra.run.dir)"
    )
    names = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            check=True).stdout.split() for _ in range(2)]
    assert names[0][0] == names[0][1] and names[1][0] == names[1][1], names  # stable within a process
    assert names[0][0] != names[1][0], names  # distinct across processes
    assert names[0][0].startswith(f"outputs/{conf}/runs/SAME-SECOND_SAME-SECOND_"), names


@pytest.mark.slow
def test_two_runs_started_together_get_two_complete_run_dirs(tmp_path):
    # Run from tmp_path, so the default dirs (outputs/train/runs/<time>_<suffix>) land there, not in the repo.
    cmd = [sys.executable, str(ROOT / "train.py"), "debug=fast", "threads=1", "~callbacks.progress_bar"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    dirs = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(dirs) == 2, dirs
    for d in dirs:
        assert {"config.yaml", "metrics.json", "data_report.json"} <= {p.name for p in d.iterdir()}, d
        assert _steps(d / "csv" / "metrics.csv") == list(range(10)), d


def _claim_in_subprocess(path: Path) -> subprocess.CompletedProcess:
    code = f"from rmlab.rundir import claim_run_dir; claim_run_dir({str(path)!r}); print('claimed')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)


def test_claim_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    from rmlab.rundir import LOCK_NAME, claim_run_dir

    lock = claim_run_dir(tmp_path)
    assert claim_run_dir(tmp_path) is lock  # the same process may claim its own dir again (in-process reruns)
    p = _claim_in_subprocess(tmp_path)
    assert p.returncode == 1 and "RunDirBusy" in p.stderr, p.stderr
    assert f"run dir {tmp_path.resolve()} is in use by another run: pid {os.getpid()}" in p.stderr, p.stderr
    assert "hydra.run.dir=<new dir>" in p.stderr and "ckpt_path=last" in p.stderr
    lock.release()
    assert _claim_in_subprocess(tmp_path).stdout.strip() == "claimed"
    assert (tmp_path / LOCK_NAME).exists()


def test_a_dead_processes_lock_does_not_block(tmp_path):
    from rmlab.rundir import LOCK_NAME, claim_run_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "started": 0}}\n')
    with claim_run_dir(tmp_path) as lock:  # a SIGKILLed run leaves its file; the kernel dropped its flock
        assert lock.held and f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()


def test_other_ranks_share_rank_zeros_dir(tmp_path, monkeypatch):
    from rmlab.rundir import claim_run_dir

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not claim_run_dir(tmp_path).held  # rank 1 of a DDP launch: rank 0 holds the dir


@pytest.mark.slow
def test_a_second_run_in_a_live_runs_dir_stops_with_the_owner_and_what_to_do(tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    base = [sys.executable, "train.py", "debug=fast", "threads=1", "~callbacks.progress_bar", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(
        [*base, "+callbacks.hold._target_=tests.faults.WaitForFile", f"+callbacks.hold.path={release}"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        t0 = time.time()
        while not (run_dir / "config.yaml").exists() and time.time() - t0 < 300:  # the first run owns the dir
            time.sleep(0.5)
        second = subprocess.run(base, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        release.touch()
        out, _ = first.communicate(timeout=300)
    finally:
        release.touch()
        first.kill()
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    msg = second.stderr
    assert f"rmlab: run dir {run_dir} is in use by another run: pid {first.pid}" in msg, msg[-2000:]
    assert "Traceback" not in msg and "hydra.run.dir=<new dir>" in msg
    assert first.returncode == 0, out[-3000:]
    assert _steps(run_dir / "csv" / "metrics.csv") == list(range(10))  # the first run's log, whole


def test_job_dir_name_is_one_flat_component_and_long_names_stay_distinct():
    """conf/*.yaml's hydra.sweep.subdir resolves through rmlab.job_dir: a '/' (or '\\') in an override becomes '_',
    so the job dir is one folder below the sweep dir; a name over MAX_DIR_NAME bytes keeps its start and a hash."""
    from omegaconf import OmegaConf

    from rmlab.rundir import MAX_DIR_NAME, job_dir_name, register_resolvers

    register_resolvers()
    for conf in ("train", "eval"):
        subdir = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / f"{conf}.yaml"))["hydra"]["sweep"]["subdir"]
        cfg = OmegaConf.create({"hydra": {"job": {"num": 3, "override_dirname": "model.name_or_path=runs/a/export,seed=1"}},
                                "subdir": subdir})  # fmt: skip
        assert cfg.subdir == "3_model.name_or_path=runs_a_export,seed=1", conf
        cfg.hydra.job.override_dirname = ""
        assert cfg.subdir == "3_", conf
    assert job_dir_name(0, "data.source=C:\\d\\x.jsonl") == "0_data.source=C:_d_x.jsonl"
    long_a, long_b = (job_dir_name(1, "model.tokenizer=" + "é" * 150 + tail) for tail in ("a", "b"))
    for name in (long_a, long_b):
        assert len(name.encode()) <= MAX_DIR_NAME and "/" not in name and name.startswith("1_model.tokenizer=éé")
        name.encode().decode()  # no character cut in half
    assert long_a != long_b


def test_a_sweep_job_resumed_after_job_dirs_became_flat_points_at_its_old_nested_dir(tmp_path):
    """A sweep started by an earlier rmlab, whose job dir nested at the '/' of an override, relaunched into the same
    hydra.sweep.dir with ckpt_path=last: its checkpoints are in the old nested dir and the job's dir is now a flat
    one. Before: 'no checkpoint yet, starting fresh', training again from step 0 in the new dir. Now: an error
    that names the old dir and how to resume from it."""
    sweep = tmp_path / "sweep"
    overrides = ["ckpt_path=last", "debug=fast", "logger=csv", "paths.data_dir=nowhere/data", "threads=1"]
    old = sweep / ("0_" + ",".join(overrides))  # Hydra's override_dirname: the task overrides, sorted, joined by ,
    assert old.parent != sweep  # nested: 0_ckpt_path=last,...,paths.data_dir=nowhere / data,threads=1
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint of the earlier run")
    env = {**ENV, "RMLAB_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    new = sweep / ("0_" + ",".join(overrides).replace("/", "_"))
    assert f"no checkpoint in {new}, but {old} has this job's checkpoints" in out, out[-3000:]
    assert f"ckpt_path={old / 'checkpoints' / 'last.ckpt'}" in out and f"mv '{old}' '{new}'" in out, out[-3000:]
    assert not (new / "checkpoints").exists()  # nothing trained over it


def _earlier_run(d: Path, task: str, task_name: str | None = None) -> None:
    """An rmlab run's outputs in ``d``; ``task``: train (its config has a trainer) or eval."""
    trainer = "trainer:\n  max_steps: 1\n" if task == "train" else ""
    for rel, text in {"config.yaml": f"task_name: {task_name or task}\nseed: 0\n{trainer}", "metrics.json": "{}", "csv/metrics.csv": "step\n0\n",
                      "checkpoints/last.ckpt": "weights", "export/config.json": "{}", f"{task}.log": "log\n",
                      ".hydra/config.yaml": "hydra\n", ".rmlab-run.lock": ""}.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)


def test_a_new_run_sets_an_earlier_run_of_its_task_aside_whole(tmp_path):
    """hydra.run.dir=D used again without ckpt_path: the earlier run's config, metrics, CSV, checkpoints and export
    move to D/previous/<time>/ unchanged (they were overwritten, or renamed -v1, before); Hydra's files, the log
    (held open, appended to) and the lock stay. A second and third new run each get their own folder."""
    from rmlab.rundir import set_aside_earlier_run

    _earlier_run(tmp_path, "train")
    moved = set_aside_earlier_run(tmp_path, "train")
    assert moved is not None and moved.parent == tmp_path / "previous"
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "config.yaml", "csv", "export", "metrics.json"]
    assert (moved / "checkpoints" / "last.ckpt").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", ".rmlab-run.lock", "previous", "train.log"]
    assert set_aside_earlier_run(tmp_path, "train") is None  # nothing left to set aside
    _earlier_run(tmp_path, "train")
    again = set_aside_earlier_run(tmp_path, "train")
    assert again is not None and again != moved and (again / "metrics.json").is_file() and (moved / "metrics.json").is_file()


def test_an_earlier_training_run_of_an_experiment_is_set_aside_by_any_training_run(tmp_path):
    """The experiments name their runs (experiment=odin_alpaca: task_name odin_alpaca): a training run in their dir is
    still a training run. By task_name alone it was neither set aside (overwritten, checkpoints renamed -v1) nor, for
    eval.py, told apart from an eval."""
    from rmlab.rundir import RunDirBusy, run_kind, set_aside_earlier_run

    assert run_kind({"task_name": "odin_alpaca", "trainer": {}}) == "train" and run_kind({"task_name": "eval"}) == "eval"
    assert run_kind({"seed": 0}) is None
    _earlier_run(tmp_path, "train", task_name="odin_alpaca")
    with pytest.raises(RunDirBusy):
        set_aside_earlier_run(tmp_path, "eval")
    moved = set_aside_earlier_run(tmp_path, "train")
    assert moved is not None and (moved / "checkpoints" / "last.ckpt").read_text() == "weights"


def test_an_eval_pointed_into_a_training_runs_dir_is_refused_and_moves_nothing(tmp_path):
    """eval.py with hydra.run.dir=<training run>: refused before it writes, naming the dir and what to do. It used to
    write its own config.yaml and metrics.json over the training run's (the checkpoint's model config then read as
    eval's: 'trained with another model'), and a second such eval, seeing an eval's config.yaml, set the training
    run's checkpoints aside under previous/ before loading one of them."""
    from rmlab.rundir import RunDirBusy, set_aside_earlier_run

    _earlier_run(tmp_path, "train")
    with pytest.raises(RunDirBusy, match=r"holds a training run .*eval\.py would write its config\.yaml and "
                                         r"metrics\.json over that run's.*hydra\.run\.dir"):
        set_aside_earlier_run(tmp_path, "eval")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "previous").exists()
    assert (tmp_path / "config.yaml").read_text().startswith("task_name: train")
    _earlier_run(tmp_path, "eval")
    with pytest.raises(RunDirBusy, match=r"holds an eval run .*train\.py would write"):
        set_aside_earlier_run(tmp_path, "train")
    (tmp_path / "config.yaml").write_text("not: [yaml")  # a torn or foreign config.yaml: not ours to move
    assert set_aside_earlier_run(tmp_path, "train") is None
    assert set_aside_earlier_run(tmp_path, "eval") is None


@pytest.mark.parametrize(
    "ckpt_path, env, in_place",
    [
        (None, None, False),
        ("last", None, True),
        (None, "last", True),  # hydra/launcher=slurm: a requeued job resumes its own dir (it set its checkpoints aside)
        ("{out}/checkpoints/last.ckpt", None, True),
        ("{out}/hpc_ckpt_3.ckpt", None, True),
        ("hpc", None, True),  # Lightning's own name for this dir's hpc_ckpt_*.ckpt
        ("{other}/checkpoints/last.ckpt", None, False),  # another run's weights: this dir's earlier run is set aside
        ("{out}/previous/x/checkpoints/last.ckpt", None, False),  # an older run set aside earlier: not the one here
    ],
)
def test_which_runs_continue_the_run_in_their_dir(ckpt_path, env, in_place, tmp_path, monkeypatch):
    from rmlab.checkpoint import resumes_in_place

    monkeypatch.delenv("RMLAB_DEFAULT_CKPT_PATH", raising=False)
    if env:
        monkeypatch.setenv("RMLAB_DEFAULT_CKPT_PATH", env)
    out = tmp_path / "run"
    path = ckpt_path.format(out=out, other=tmp_path / "other") if ckpt_path else None
    assert resumes_in_place(path, out) is in_place


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_its_checkpoints_instead_of_setting_them_aside(tmp_path):
    """hydra/launcher=slurm gives each job RMLAB_DEFAULT_CKPT_PATH=last (ckpt_path unset): the requeued job must
    resume from its run dir's checkpoints. The earlier-run set-aside read only ckpt_path, moved them into previous/
    and trained again from step 0."""
    run = tmp_path / "run"
    # max_epochs=2: a run that stopped at max_steps inside its only epoch resumes as finished (Lightning's loop state)
    cmd = [sys.executable, "train.py", "debug=fast", "threads=1", "trainer.max_epochs=2", f"hydra.run.dir={run}"]
    env = {**ENV, "RMLAB_DEFAULT_CKPT_PATH": "last"}
    first = subprocess.run([*cmd, "trainer.max_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([*cmd, "trainer.max_steps=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in out and "held an earlier run" not in out, out[-3000:]
    assert not (run / "previous").exists() and "steps 4," in out, out[-3000:]
    assert _steps(run / "csv" / "metrics.csv") == [0, 1, 2, 3]  # steps 0-1 kept, 2-3 trained on top
