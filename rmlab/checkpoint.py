"""Fault tolerance: atomic checkpoint files, exact resume, and the pieces a resumed run needs.

Exact resume means a run killed at any moment and restarted with ``ckpt_path=last`` ends with the same
weights as one that never stopped. Lightning restores the model, optimizer, scheduler and loop counters;
this module adds what it does not:

- ``AtomicCheckpointIO``: a checkpoint is written to a temp file in the same folder, fsynced, then
  ``os.replace``d over its name, so a kill mid-write never leaves a half-written ``last.ckpt``.
  Loading is ``weights_only=True`` (nothing in an rmlab checkpoint needs pickle).
- ``ResumeState``: the RNG states (torch, CUDA, numpy, python) saved with each checkpoint and restored
  right before the first resumed batch; the CSV log flushed as training goes and cut back to the
  checkpoint's step on resume, so logged steps continue without duplicates.
- ``ResumableLoader``: a DataLoader that Lightning sees as stateful, so the grouped batch sampler's
  position (epoch, batches consumed) goes into the checkpoint and the resumed epoch skips what was done.
- ``resolve_ckpt_path``: ``ckpt_path=last`` means the newest of ``<run dir>/checkpoints/last.ckpt`` and
  Lightning's SLURM ``hpc_ckpt_*.ckpt``; a missing one starts fresh, so one command serves both the first
  launch and every requeue.
- Under ``hydra/launcher=slurm`` submitit owns preemption: on SIGUSR2 it resubmits the same job and exits.
  ``checkpoint_plugins`` turns Lightning's own SLURM requeue off there, so exactly one mechanism requeues,
  and the launcher config's ``hydra.job.env_set`` gives every job ``RMLAB_DEFAULT_CKPT_PATH=last`` and
  ``RMLAB_DEFAULT_CKPT_EVERY_N_STEPS``: the defaults ``resolve_ckpt_path`` and ``ResumeState`` apply when the
  config leaves ``ckpt_path`` / ``every_n_train_steps`` unset.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader

log = logging.getLogger("rmlab")


# ------------------------------------------------------------------------------------ atomic files
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are either the old file or the new one, never a torn mix."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # Safe by default: an rmlab checkpoint holds tensors and plain types only.
        return super().load_checkpoint(
            path, map_location=map_location, weights_only=True if weights_only is None else weights_only
        )


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to ``.<name>.tmp-<pid>`` beside ``path``, fsync, then rename over it (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only when the save itself failed
            tmp.unlink()
    try:  # make the rename itself durable (a power cut after replace)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def checkpoint_plugins(trainer_cfg: Any) -> list:
    """The Trainer plugins rmlab adds; none when the trainer config sets its own ``plugins``.

    - A CheckpointIO for the strategy. DeepSpeed writes its own sharded folders (and a `latest` tag last, which
      is its own atomicity), so it gets none; every other strategy gets AtomicCheckpointIO.
    - Under submitit's SLURM launcher, ``SLURMEnvironment(auto_requeue=False)``: submitit requeues on its own
      signal (see ``under_submitit_slurm``), and Lightning must not requeue the job a second time.
    """
    if trainer_cfg.get("plugins"):
        return []
    strategy = trainer_cfg.get("strategy") if hasattr(trainer_cfg, "get") else None
    name = strategy if isinstance(strategy, str) else str((strategy or {}).get("_target_", ""))
    plugins: list = [] if "deepspeed" in name.lower() else [AtomicCheckpointIO()]
    if under_submitit_slurm():
        from lightning.fabric.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def under_submitit_slurm() -> bool:
    """True in a job that submitit started on SLURM (``hydra/launcher=slurm``).

    submitit signals preemption and the coming time limit with SIGUSR2 (its ``USR_SIG``; SIGUSR1 is left to
    NCCL), registered before the job runs; it then resubmits the same job (same overrides, same run dir) and
    exits. Lightning's SLURM auto-requeue listens to SIGUSR1 and skips a signal that already has a handler, so
    it would either never fire or fire beside submitit: rmlab turns it off and lets submitit requeue."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def default_checkpoint_interval(trainer: L.Trainer) -> int | None:
    """Apply ``RMLAB_DEFAULT_CKPT_EVERY_N_STEPS`` (set by ``hydra/launcher=slurm``) to every ModelCheckpoint
    that has neither a step nor a time interval, so a preemptible job checkpoints every N optimizer steps.
    An explicit ``callbacks.model_checkpoint.every_n_train_steps`` wins. Returns N when it was applied."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    n = int(os.environ.get("RMLAB_DEFAULT_CKPT_EVERY_N_STEPS") or 0)
    applied = None
    for cb in trainer.checkpoint_callbacks:
        # ModelCheckpoint reads these attributes at every batch end; there is no public setter after __init__.
        if (
            n > 0
            and isinstance(cb, ModelCheckpoint)
            and cb._every_n_train_steps < 1
            and cb._train_time_interval is None
        ):
            cb._every_n_train_steps = applied = n
    if applied:
        log.info("checkpoints every %d optimizer steps (RMLAB_DEFAULT_CKPT_EVERY_N_STEPS)", n)
    return applied


# ---------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors and plain types, so the checkpoint loads with weights_only=True."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ the sampler position
class ResumableLoader(DataLoader):
    """The training DataLoader: stateful for Lightning (``state_dict``/``load_state_dict``), and the one
    that sets the batch sampler's epoch.

    - The position is read from the trainer's batch progress, not counted in the sampler: Lightning
      prefetches a batch ahead, so the sampler has always yielded one more batch than was trained on.
    - Lightning's ``set_epoch`` reaches only ``loader.sampler`` and ``loader.batch_sampler.sampler``, never a
      custom batch sampler, so without this every epoch would repeat epoch 0's order.
    """

    def __init__(self, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._trainer = trainer

    def __iter__(self):
        if self._trainer is not None and hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self._trainer.current_epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        consumed = batches_done(self._trainer) if self._trainer is not None else 0
        return self.batch_sampler.state_dict(consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)


def batches_done(trainer: L.Trainer) -> int:
    """Training batches finished in the current epoch (including the one whose end hooks are running)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


# ------------------------------------------------------------------------------------- the callback
class ResumeState(L.Callback):
    """Saves RNG states with each checkpoint and restores them before the first resumed batch; keeps the
    CSV log in step with the checkpoints (flushed every batch, cut back to the checkpoint on resume)."""

    def __init__(self, resuming_loggers: Any = ()) -> None:
        self._pending_rng: dict[str, Any] | None = None
        # Read now: Lightning creates the CSV writer (which deletes metrics.csv) before restoring a checkpoint.
        self._csv_rows = {
            str(lg.log_dir): read_csv_rows(lg) for lg in resuming_loggers if type(lg).__name__ == "CSVLogger"
        }

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before Lightning restores a checkpoint, so the callback's state key stays stable
            default_checkpoint_interval(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The best val accuracy so far, as a float: a persistent torchmetrics state would be deep-copied by
        # state_dict(), which fails on FSDP's lazily loaded tensors.
        best = getattr(pl_module, "val_acc_best", None)
        if best is not None and best.update_called:
            checkpoint["rmlab_val_acc_best"] = float(best.max_value)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        best = getattr(pl_module, "val_acc_best", None)
        if best is not None and "rmlab_val_acc_best" in checkpoint:
            best.update(torch.tensor(checkpoint["rmlab_val_acc_best"]))
        if not trainer.is_global_zero:
            return
        step = int(checkpoint.get("global_step", 0))
        for lg in trainer.loggers:
            if type(lg).__name__ == "CSVLogger" and self._csv_rows.get(str(lg.log_dir)):
                n = restore_csv_log(lg, self._csv_rows.pop(str(lg.log_dir)), step)
                if n:
                    log.info("resume: dropped %d CSV rows logged after step %d (they are logged again)", n, step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_rng is not None:
            # Here, not at load time: building the epoch's DataLoader iterator draws from torch's RNG.
            restore_rng(self._pending_rng)
            self._pending_rng = None
        # A kill loses at most the current step's rows: Lightning's CSV logger buffers 100 steps by default.
        for lg in trainer.loggers:
            if type(lg).__name__ == "CSVLogger" and getattr(lg, "_experiment", None) is not None:
                lg.save()


def read_csv_rows(logger: Any) -> list[list[str]]:
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.reader(f))


def restore_csv_log(logger: Any, rows: list[list[str]], step: int) -> int:
    """Keep a resumed run's CSV log whole: rows up to the checkpoint stay, rows a killed run logged after
    it (``step >= step``: Lightning logs optimizer step s+1's metrics at ``step=s``) go, since the resumed
    run logs them again. Lightning's CSV writer deletes an existing metrics.csv when it is created, so the
    rows were read before (``read_csv_rows``) and are written back here. Returns the number of rows dropped."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not rows or "step" not in rows[0]:
        return 0
    header, i = rows[0], rows[0].index("step")
    keep = [r for r in rows[1:] if not (len(r) > i and r[i] != "" and int(float(r[i])) >= step)]
    writer = logger.experiment  # created here (it deletes metrics.csv), then told the old header
    writer.metrics_keys = list(header)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *keep])
    os.replace(tmp, path)
    return len(rows) - 1 - len(keep)


# --------------------------------------------------------------------------------- resume helpers
def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """``last`` -> the newest of ``<run dir>/checkpoints/last.ckpt`` and ``<run dir>/hpc_ckpt_*.ckpt``
    (written by Lightning when SLURM preempts), or None (start fresh) when the run dir has neither.

    Unset, it is ``$RMLAB_DEFAULT_CKPT_PATH`` when that says ``last``: ``hydra/launcher=slurm`` sets it, so a job
    submitit requeued resumes from its own run dir instead of training again over its checkpoints."""
    if ckpt_path is None and os.environ.get("RMLAB_DEFAULT_CKPT_PATH") == "last":
        ckpt_path = "last"
    if ckpt_path != "last":
        return ckpt_path
    out = Path(output_dir)
    found = [p for p in [out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    if not found:
        log.info("ckpt_path=last: no checkpoint in %s yet, starting fresh", out)
        return None
    best = max(found, key=lambda p: p.stat().st_mtime)
    log.info("ckpt_path=last: resuming from %s", best)
    return str(best)


def wandb_run_id(output_dir: str | os.PathLike) -> str:
    """The wandb run id of this run dir, created on first use, so a resumed (or requeued) run logs to the
    same wandb run instead of starting a new one."""
    f = Path(output_dir) / "wandb_id"
    if f.exists():
        return f.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":
        f.write_text(run_id + "\n")
    return run_id


def save_inspection_checkpoint(trainer: L.Trainer, name: str, info: dict[str, Any]) -> Path | None:
    """Write the current state to ``<checkpoints>/<name>`` for a post-mortem, beside (never over) the last
    good checkpoint. Written by this rank alone, with no barrier: the other ranks may not be failing."""
    ckpt_dir = None
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None):
            ckpt_dir = Path(cb.dirpath)
            break
    ckpt_dir = ckpt_dir or Path(trainer.default_root_dir) / "checkpoints"
    path = ckpt_dir / name
    try:
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        state["nonfinite"] = info
        atomic_torch_save(state, path)
        return path
    except Exception as e:  # the guard's own error message matters more than the post-mortem file
        log.warning("could not write the inspection checkpoint %s: %s", path, e)
        return None
