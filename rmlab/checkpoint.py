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
- The training loader's position: ``rmlab.data.loader.ResumableLoader`` is a DataLoader Lightning sees as
  stateful, so the grouped batch sampler's position (epoch, batches consumed) goes into the checkpoint;
  ``ResumeState`` hands it back at ``on_train_start`` (Lightning skips that whenever the loader was built
  before the restore, i.e. with a finite ``max_epochs``), and the resumed epoch skips what was done.
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
import json
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
from omegaconf import DictConfig, OmegaConf

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
        try:
            return super().load_checkpoint(
                path, map_location=map_location, weights_only=True if weights_only is None else weights_only
            )
        except FileNotFoundError:
            raise
        except Exception as e:  # a torn, empty or foreign file: say which, and what to do
            if Path(path).is_file() and (why := checkpoint_problem(path)):
                raise CheckpointError(unreadable_message(Path(path), why)) from e
            raise


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


def overwrite_on_resume(trainer: L.Trainer) -> None:
    """A resumed run writes its checkpoints under their own names: ``last.ckpt`` and each ``stepN.ckpt`` it
    trains again are overwritten (atomically). Lightning's version counter would write ``last-v1.ckpt`` beside
    the ``last.ckpt`` it did not write itself, which is every resume from a run dir that was moved or copied
    (the checkpoint records the old dir): ``last.ckpt`` then stayed at the old step while the summary's
    ``eval.py`` line named it. A fresh run keeps the counter, so it never overwrites an older run's files."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb._enable_version_counter = False  # read at each save; there is no public setter after __init__


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


# ------------------------------------------------------------------------------------- the callback
_ONE_RANK_DUMP = False  # set while one rank alone dumps a checkpoint (save_inspection_checkpoint)


class ResumeState(L.Callback):
    """Saves RNG states with each checkpoint and restores them before the first resumed batch; keeps the
    CSV log in step with the checkpoints (flushed every batch, cut back to the checkpoint on resume)."""

    def __init__(self, resuming_loggers: Any = (), model_cfg: Any = None) -> None:
        # The resolved model config goes into every checkpoint, so a resume or an eval with another model
        # is refused before that model is built (check_checkpoint).
        self._model = model_fingerprint(model_cfg) if model_cfg is not None else None
        self._pending_rng: dict[str, Any] | None = None
        self._pending_loaders: list[dict[str, Any]] = []
        self._val_due = False
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
        # Rank 0's states; on_load_checkpoint (called first) may have set this rank's own.
        if self._pending_rng is None:
            self._pending_rng = state_dict.get("rng")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The best val accuracy so far, as a float: a persistent torchmetrics state would be deep-copied by
        # state_dict(), which fails on FSDP's lazily loaded tensors.
        if self._model is not None:
            checkpoint["rmlab_model"] = self._model
        # Every rank's RNG states (the callback state holds rank 0's only: only rank 0 writes the file), so each
        # rank draws its own dropout masks again on resume. A collective: every rank dumps the checkpoint, except
        # for the NaN guard's one-rank inspection checkpoint, which skips it.
        if trainer.world_size > 1 and not _ONE_RANK_DUMP and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, capture_rng())
            checkpoint["rmlab_rng_by_rank"] = states
        best = getattr(pl_module, "val_acc_best", None)
        if best is not None and best.update_called:
            checkpoint["rmlab_val_acc_best"] = float(best.max_value)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if continue_cut_epoch(checkpoint):  # before Lightning restores its loops from it
            log.info("the checkpoint's run stopped at step %s inside an epoch: a larger trainer.max_steps continues "
                     "that epoch from where it stopped", checkpoint.get("global_step"))
        by_rank = checkpoint.get("rmlab_rng_by_rank")
        if by_rank and len(by_rank) == trainer.world_size:
            self._pending_rng = by_rank[trainer.global_rank]
        fit_state = ((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("state_dict") or {}
        self._pending_loaders = list(fit_state.get("combined_loader") or [])
        self._val_due = saved_at_an_epochs_last_batch(checkpoint)
        best = getattr(pl_module, "val_acc_best", None)
        if best is not None and "rmlab_val_acc_best" in checkpoint:
            best.update(torch.tensor(checkpoint["rmlab_val_acc_best"]))
        if not trainer.is_global_zero:
            return
        step = int(checkpoint.get("global_step", 0))
        for lg in trainer.loggers:
            if type(lg).__name__ == "CSVLogger" and self._csv_rows.get(str(lg.log_dir)):
                # The epoch's validation is run again on resume (rerun_skipped_validation): its rows go too.
                redo = step - 1 if self._val_due else None
                n = restore_csv_log(lg, self._csv_rows.pop(str(lg.log_dir)), step, redo_val_step=redo)
                if n:
                    log.info("resume: dropped %d CSV rows logged after step %d (they are logged again)", n, step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The training loader's position. Lightning hands it back only when it builds the loader after the
        # restore; with a finite max_epochs the LR schedule's `estimated_stepping_batches` builds it before, and
        # the resumed epoch would start over from its first batch. Applying it here (again, when Lightning did)
        # is harmless: the sampler reads it when the epoch's iteration begins, after this hook.
        states, self._pending_loaders = self._pending_loaders, []
        if states:
            restore_loader_states(trainer, states)
        if start_next_epoch_properly(trainer):
            # Resumed from an epoch's last batch. A run that never stopped validates next (the val loader's
            # iterator draws a seed from torch's RNG), then builds the next epoch's iterator (another draw, which
            # Lightning makes here too), then trains: so the checkpoint's RNG states go back now, before both.
            if self._pending_rng is not None:
                restore_rng(self._pending_rng)
                self._pending_rng = None
            if self._val_due:
                rerun_skipped_validation(trainer)

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


def restore_loader_states(trainer: L.Trainer, states: list[dict[str, Any]]) -> None:
    """Load a checkpoint's ``combined_loader`` states into the trainer's stateful training loaders, in order."""
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    loaders = trainer.fit_loop._combined_loader
    flat = loaders.flattened if isinstance(loaders, CombinedLoader) else [trainer.train_dataloader]
    stateful = [dl for dl in flat if callable(getattr(dl, "state_dict", None)) and callable(getattr(dl, "load_state_dict", None))]
    if len(stateful) != len(states):
        raise RuntimeError(
            f"the checkpoint holds the position of {len(states)} training loader(s), this run has {len(stateful)}: "
            "resume with the same data config"
        )
    for dl, state in zip(stateful, states):
        dl.load_state_dict(state)
    trainer.fit_loop._combined_loader_states_to_load = []  # never a second time (e.g. on a loader reload)


def saved_at_an_epochs_last_batch(checkpoint: dict[str, Any]) -> bool:
    """True for a checkpoint written at the end of an epoch's last training batch (``every_n_train_steps``
    landing on it): before that epoch's validation and epoch-end hooks ran."""
    loops = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    batches, epochs = loops.get("epoch_loop.batch_progress") or {}, loops.get("epoch_progress") or {}
    try:
        total, ep = batches["total"], epochs["current"]
        return bool(
            batches.get("is_last_batch")
            and total["completed"] == total["processed"] - 1
            and ep["processed"] == ep["started"] - 1
        )
    except (KeyError, TypeError):
        return False


def continue_cut_epoch(checkpoint: dict[str, Any]) -> bool:
    """A run that stopped inside an epoch (``max_steps`` reached, ``max_time``, a stop request) wrote its last
    checkpoint after that epoch's end hooks, so Lightning counts the epoch as processed, and a resume with a
    larger ``max_steps`` starts the next epoch, or under ``max_epochs=1`` (the default) trains nothing at all.
    Mark such an epoch unprocessed, in place, so the resume continues it from the batch where it stopped (the
    loader's position is in the checkpoint), as a resume from a checkpoint written mid-epoch does. True when it
    did; a checkpoint written after an epoch's last batch is left as it is."""
    loops = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    batches, epochs = loops.get("epoch_loop.batch_progress") or {}, loops.get("epoch_progress") or {}
    try:
        cur, tot = epochs["current"], epochs["total"]
        # The epoch loop ended (processed == started), and completed too or not yet (written at the epoch's end
        # hooks or at the end of fit), while its batches had not run out (not the last batch).
        cut = bool(
            not batches.get("is_last_batch")
            and batches["current"]["completed"] > 0
            and cur["processed"] == cur["started"]
            and cur["completed"] in (cur["processed"] - 1, cur["processed"])
        )
    except (KeyError, TypeError):
        return False
    if cut:  # back to the state of a mid-epoch checkpoint: started, neither processed nor completed
        for progress in (cur, tot):
            progress["completed"] = progress["processed"] = progress["started"] - 1
    return cut


def rerun_skipped_validation(trainer: L.Trainer) -> None:
    """Lightning resumes a checkpoint written at an epoch's last batch past that epoch's validation (it counts
    it as done), though a run that never stopped validates there, and a kill in that validation loses it. Run
    it here, before the next epoch, when the trainer validates at each epoch's end (the default:
    ``val_check_interval=1.0``, ``check_val_every_n_epoch`` set): same weights, same val rows, same best val
    accuracy. The epoch-end training aggregates (``train/*_epoch``) are not rebuilt: they live in memory only."""
    closed = trainer.current_epoch - 1
    every = trainer.check_val_every_n_epoch
    if not trainer.enable_validation or every is None or (closed + 1) % every:
        return
    n, check = trainer.num_training_batches, trainer.val_check_batch
    if check is None or check == float("inf") or n == float("inf") or n % int(check):
        return
    val = trainer.fit_loop.epoch_loop.val_loop
    val.restarting = False  # a fresh validation, not the continuation of one
    trainer.validating = True
    try:
        val.run()
    finally:
        trainer.training = True


def start_next_epoch_properly(trainer: L.Trainer) -> bool:
    """Resumed from a checkpoint written at an epoch's last training batch (``every_n_train_steps`` landing on
    it), Lightning 2.6 closes that epoch (processed, completed) but then goes on into the next one as if it had
    restarted in the middle of it: the next epoch is never counted as started, so a checkpoint written in it
    resumes one epoch short and the run trains an extra epoch; its ``on_train_epoch_start`` hooks are skipped
    too. Here that restart is turned into the plain start of the next epoch, as in a run that never stopped."""
    from lightning.pytorch.loops.fit_loop import RestartStage

    fit = trainer.fit_loop
    epoch = fit.epoch_loop
    if (
        fit._restart_stage == RestartStage.RESTARTED_MID_EPOCH
        and epoch.restarted_on_train_batch_end
        and epoch.batch_progress.is_last_batch
    ):
        fit.reset_restart_stage()
        return True
    return False


def read_csv_rows(logger: Any) -> list[list[str]]:
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.reader(f))


def restore_csv_log(logger: Any, rows: list[list[str]], step: int, redo_val_step: int | None = None) -> int:
    """Keep a resumed run's CSV log whole: rows up to the checkpoint stay, rows a killed run logged after
    it (``step >= step``: Lightning logs optimizer step s+1's metrics at ``step=s``) go, since the resumed
    run logs them again. Lightning's CSV writer deletes an existing metrics.csv when it is created, so the
    rows were read before (``read_csv_rows``) and are written back here. Returns the number of rows dropped."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not rows or "step" not in rows[0]:
        return 0
    header, i = rows[0], rows[0].index("step")
    val = [j for j, name in enumerate(header) if name.startswith("val/")]

    def redone(r: list[str]) -> bool:
        at = int(float(r[i])) if len(r) > i and r[i] != "" else None
        if at is None:
            return False
        # A validation logged at `redo_val_step` is run again on resume: its rows are logged again too.
        return at >= step or (at == redo_val_step and any(j < len(r) and r[j] != "" for j in val))

    keep = [r for r in rows[1:] if not redone(r)]
    writer = logger.experiment  # created here (it deletes metrics.csv), then told the old header
    writer.metrics_keys = list(header)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *keep])
    os.replace(tmp, path)
    return len(rows) - 1 - len(keep)


# --------------------------------------------------------------------------------- resume helpers
class CheckpointError(RuntimeError):
    """A checkpoint or export that cannot be used: the message names the file, what is wrong and what to do."""


# Checkpoints in <run dir>/checkpoints that a resume never falls back to: the NaN guard's post-mortem state.
NOT_A_RESUME_POINT = ("nonfinite-",)


def load_lightning_checkpoint(p: Path, map_location: Any = "cpu", mmap: bool = False) -> tuple[dict | None, str | None]:
    """(the checkpoint, None) when ``p`` loads as a Lightning checkpoint (``weights_only=True``), else (None, why)."""
    try:
        state = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        return None, _why(e, p)
    if not isinstance(state, dict) or "state_dict" not in state:
        return None, "not a Lightning checkpoint (no state_dict in it)"
    return state, None


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with a ``CheckpointError`` naming the file (and an intact one
    beside it) when it is missing, empty, truncated or not a torch checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist. {_next_step(p)}")
    state, why = load_lightning_checkpoint(p, map_location, mmap)
    if why is not None:
        raise CheckpointError(unreadable_message(p, why))
    return state


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a usable checkpoint ("empty", "truncated ...", ...), or None when it loads.

    Cheap: the load is memory-mapped, so it reads the metadata, not the tensors. A directory (a sharded
    FSDP/DeepSpeed checkpoint) is taken as it is."""
    p = Path(path)
    return None if p.is_dir() else load_lightning_checkpoint(p, mmap=True)[1]


def _why(e: Exception, p: Path) -> str:
    try:
        size = p.stat().st_size
    except OSError:
        return f"cannot be read ({e})"
    if size == 0:
        return "empty (0 bytes): its write never happened"
    text = (str(e).splitlines()[0] if str(e) else type(e).__name__).split(". ")[0]  # torch adds a paragraph
    if "central directory" in text or isinstance(e, EOFError) or "zip archive" in text:
        return f"truncated or torn ({size} bytes; torch: {text})"
    return f"not loadable ({type(e).__name__}: {text[:300]})"


def unreadable_message(p: Path, why: str) -> str:
    return f"checkpoint {p} is {why}. {_next_step(p)}"


def _next_step(p: Path) -> str:
    """What to do instead of a broken checkpoint: the newest intact one beside it, or a fresh start."""
    good = intact_checkpoints(p.parent, exclude=p)
    if good:
        return (
            f"Resume from the newest intact checkpoint beside it: ckpt_path={good[0]} "
            "(ckpt_path=last picks it on its own)."
        )
    return (
        f"There is no intact checkpoint in {p.parent}: move that folder aside and start fresh, or pass "
        "ckpt_path=<a checkpoint from another run dir>."
    )


def _ckpt_order(p: Path) -> tuple[float, int]:
    digits = "".join(c if c.isdigit() else " " for c in p.stem).split()
    return (p.stat().st_mtime, int(digits[-1]) if digits else -1)


def intact_checkpoints(folder: str | os.PathLike, exclude: Path | None = None) -> list[Path]:
    """The loadable checkpoints in ``folder`` (``*.ckpt`` but the NaN guard's), newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.glob("*.ckpt")
        if not p.name.startswith(NOT_A_RESUME_POINT) and (exclude is None or p.resolve() != exclude.resolve())
    ]
    found.sort(key=_ckpt_order, reverse=True)
    return [p for p in found if checkpoint_problem(p) is None]


def requested_ckpt_path(ckpt_path: str | None) -> str | None:
    """``ckpt_path`` as given, or ``last`` when it is unset and ``$RMLAB_DEFAULT_CKPT_PATH`` says ``last``."""
    if ckpt_path is None and os.environ.get("RMLAB_DEFAULT_CKPT_PATH") == "last":
        return "last"
    return ckpt_path


def resumes_in_place(ckpt_path: str | None, output_dir: str | os.PathLike) -> bool:
    """Whether this run continues the run already in ``output_dir`` (so its outputs stay where they are): ``last``
    (given, or the default under ``hydra/launcher=slurm``: a requeued job) or a checkpoint in ``<output_dir>/
    checkpoints/`` or ``<output_dir>`` itself. No ``ckpt_path``, or another run's checkpoint, starts this dir anew:
    an earlier run in it is set aside first (``rmlab.rundir.set_aside_earlier_run``)."""
    ckpt_path = requested_ckpt_path(ckpt_path)
    if not ckpt_path:
        return False
    if ckpt_path in ("last", "hpc", "best"):  # rmlab's `last`; Lightning's names for checkpoints of this dir
        return True
    out = Path(output_dir).resolve()
    return Path(ckpt_path).resolve().parent in (out, out / "checkpoints")


def resolve_ckpt_path(
    ckpt_path: str | None, output_dir: str | os.PathLike, nested_dir: str | os.PathLike | None = None
) -> str | None:
    """``last`` -> the newest of ``<run dir>/checkpoints/last.ckpt`` and ``<run dir>/hpc_ckpt_*.ckpt``
    (written by Lightning when SLURM preempts), or None (start fresh) when the run dir has neither.

    When that newest file is unreadable (empty, truncated), the newest intact checkpoint of the run dir is
    used instead, and the fallback is logged and printed; when none is intact, a ``CheckpointError`` says so
    (training again from scratch over them would be a silent loss).

    Unset, it is ``$RMLAB_DEFAULT_CKPT_PATH`` when that says ``last``: ``hydra/launcher=slurm`` sets it, so a job
    submitit requeued resumes from its own run dir instead of training again over its checkpoints.

    ``nested_dir``: the dir an earlier rmlab gave this multirun job (``rmlab.rundir.nested_job_dir``); when the run
    dir has no checkpoint and that one has, a ``CheckpointError`` says how to resume from it, rather than a fresh
    start in the new dir."""
    ckpt_path = requested_ckpt_path(ckpt_path)
    if ckpt_path != "last":
        return ckpt_path
    out = Path(output_dir)
    # last-v1.ckpt: Lightning's name for `last` when a last.ckpt it did not write is in the way.
    lasts = [out / "checkpoints" / "last.ckpt", *(out / "checkpoints").glob("last-v*.ckpt")]
    found = [p for p in [*lasts, *out.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    if not found:
        old = Path(nested_dir) if nested_dir is not None else None
        if old is not None and any(p.is_file() for p in [*(old / "checkpoints").glob("*.ckpt"), *old.glob("hpc_ckpt_*.ckpt")]):
            raise CheckpointError(
                f"ckpt_path=last: no checkpoint in {out}, but {old} has this job's checkpoints: the sweep was started "
                f"by an earlier rmlab, whose job dirs nested where an override holds a '/'; job dirs are one flat folder "
                f"now. Resume from it with ckpt_path={old / 'checkpoints' / 'last.ckpt'}, or keep one dir: "
                f"rm -r '{out}' && mv '{old}' '{out}', then rerun with ckpt_path=last."
            )
        log.info("ckpt_path=last: no checkpoint in %s yet, starting fresh", out)
        return None
    best = max(found, key=lambda p: p.stat().st_mtime)
    why = checkpoint_problem(best)
    if why is None:
        log.info("ckpt_path=last: resuming from %s", best)
        return str(best)
    candidates = [p for p in found if p != best and checkpoint_problem(p) is None]
    candidates += intact_checkpoints(out / "checkpoints", exclude=best)
    if not candidates:
        raise CheckpointError(
            f"ckpt_path=last: {best} is {why}, and no other checkpoint in {out / 'checkpoints'} is intact. Move "
            f"{out / 'checkpoints'} aside to start this run fresh, or pass ckpt_path=<a checkpoint>."
        )
    good = max(candidates, key=_ckpt_order)
    msg = f"ckpt_path=last: {best} is {why}; resuming from the newest intact checkpoint, {good}, instead"
    log.warning(msg)
    print(f"rmlab: {msg}", flush=True)
    return str(good)


# ----------------------------------------------------------------------- the architecture fingerprint
# Model config keys that change how a model runs, not which weights it has: they may differ on resume.
RUNTIME_KEYS = {
    "compile",
    "attn_implementation",
    "forward_mode",
    "row_tokens",
    "gradient_checkpointing",
    "trust_remote_code",
    "liger",
}


def model_fingerprint(model_cfg: Any) -> dict[str, Any]:
    """The resolved model config as plain types (what a checkpoint stores under ``rmlab_model``)."""
    if isinstance(model_cfg, DictConfig):
        return OmegaConf.to_container(model_cfg, resolve=True)
    return dict(model_cfg)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _architectural(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf not in RUNTIME_KEYS and "dropout" not in leaf


# Keys that say which model it is, listed before the sizes they imply.
IDENTITY_KEYS = ("_target_", "name_or_path", "tokenizer", "head", "config")


def architecture_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``model.<key>: checkpoint <a>, this config <b>`` for every weight-deciding key that differs, the keys that
    name the model (class, name_or_path, tokenizer, head) first. A key set to None counts as unset, so a config
    with no ``model.config`` and a checkpoint with one list the checkpoint's sizes, not ``None`` vs ``<unset>``."""
    a, b = _flat(saved), _flat(current)

    def shown(v: Any) -> str:
        return "<unset>" if v is None else repr(v)

    def rank(key: str) -> tuple[int, str]:
        top = key.split(".", 1)[0]
        return (IDENTITY_KEYS.index(top) if top in IDENTITY_KEYS else len(IDENTITY_KEYS), key)

    out = []
    for key in sorted(set(a) | set(b), key=rank):
        x, y = a.get(key), b.get(key)
        if _architectural(key) and x != y:
            out.append(f"model.{key}: checkpoint {shown(x)}, this config {shown(y)}")
    return out


def check_checkpoint(path: str | os.PathLike, model_cfg: Any) -> dict[str, Any] | None:
    """Check a checkpoint before any model is built: it loads (else ``CheckpointError`` naming the file and an
    intact one beside it), and it was trained with the architecture ``model_cfg`` describes (else
    ``CheckpointError`` listing the model config keys that differ). Returns the checkpoint's stored model
    config, or None for a sharded (directory) checkpoint or one written before rmlab stored it.

    Memory-mapped: the tensors are not read. Call it for ``ckpt_path`` in training (``resume_checkpoint``)
    and in eval before instantiating the model."""
    p = Path(path)
    if p.is_dir():
        log.info("%s is a sharded checkpoint: its architecture is not checked before loading", p)
        return None
    state = read_checkpoint(p, mmap=True)
    saved = state.get("rmlab_model")
    if saved is None:
        log.info("%s records no model config (written before rmlab stored one): architecture not checked", p)
        return None
    if model_cfg is not None:
        diff = architecture_diff(saved, model_fingerprint(model_cfg))
        if diff:
            shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise CheckpointError(
                f"checkpoint {p} was trained with another model: {shown}. Use the model config it was trained "
                f"with (the run's config.yaml beside checkpoints/ has it), or start a new run dir for this model."
            )
    return saved


def resume_checkpoint(
    ckpt_path: str | None, output_dir: str | os.PathLike, model_cfg: Any, nested_dir: str | os.PathLike | None = None
) -> str | None:
    """``resolve_ckpt_path`` then ``check_checkpoint``: the checkpoint a run resumes from, checked before the
    model is built. Call it before instantiating the model."""
    path = resolve_ckpt_path(ckpt_path, output_dir, nested_dir)
    if path is not None:
        check_checkpoint(path, model_cfg)
    return path


# ------------------------------------------------------------------------------------- export dirs
def check_export_dir(path: str | os.PathLike, thorough: bool = False) -> None:
    """Check a Hugging Face export dir before loading it: ``config.json`` is a JSON object (and its ``rmlab``
    record, when there is one, an object too), every other ``*.json`` in it parses (the tokenizer's files), and
    every ``*.safetensors`` file is complete (its header reads, and the file is as long as the header's offsets
    say). Raises ``CheckpointError`` naming the file. A sharded export is checked shard by shard through its index.

    A ``*.json`` over ``LARGE_JSON`` bytes other than config.json and the index (a real vocabulary's
    tokenizer.json: 17 MB for Llama 3.1, 0.2 to 0.4 s to decode in Python, more than the tokenizer's own load
    adds) is only checked to end where it began (a cut copy does not), unless ``thorough``: the loaders run the
    thorough check when loading fails, so damage inside such a file is still named."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"export dir {d} does not exist (or is not a directory)")
    redo = "Copy the export again, or export again from the run's checkpoint (a train.py run with export=true writes it)."
    cfg = d / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg} is missing: {d} is not a complete export. {redo}")
    docs = {}
    for f in sorted(d.glob("*.json")):  # config, tokenizer, index: each one whole JSON (transformers names none)
        if thorough or f.name in ("config.json", "model.safetensors.index.json") or f.stat().st_size <= LARGE_JSON:
            docs[f.name], problem = read_json(f)
        else:
            docs[f.name], problem = None, json_cut(f)
        if problem:
            raise CheckpointError(f"{f} is not valid JSON ({problem}): the export is incomplete or damaged. {redo}")
    config = docs["config.json"]
    if not isinstance(config, dict):
        what = "null" if config is None else type(config).__name__
        raise CheckpointError(f"{cfg} is not a model config (it holds a JSON {what}, not an object). {redo}")
    meta = config.get("rmlab", {})
    if not isinstance(meta, dict) or not isinstance(meta.get("head", ""), str):
        raise CheckpointError(f"{cfg} has a damaged rmlab record (an object with a head name was expected). {redo}")
    index = d / "model.safetensors.index.json"
    files: set[Path] = set(d.glob("*.safetensors"))
    if index.is_file():
        weight_map = docs[index.name].get("weight_map") if isinstance(docs[index.name], dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map of file names). {redo}")
        files |= {d / name for name in set(weight_map.values())}
    elif not (d / "model.safetensors").exists() and not any(d.glob("*.bin")):
        raise CheckpointError(f"{d / 'model.safetensors'} is missing: {d} holds no weights. {redo}")
    for f in sorted(files):
        problem = safetensors_problem(f)
        if problem:
            raise CheckpointError(f"{f} is {problem}. {redo}")


LARGE_JSON = 1 << 20  # bytes: a JSON file of an export above this is decoded only by the thorough check


def json_cut(path: Path) -> str | None:
    """Why a JSON file is cut off, read from its two ends only (None when it ends with the bracket that closes
    its first one): what a copy or write that stopped midway leaves, found without decoding the whole file."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(max(0, path.stat().st_size - 64))
        tail = f.read().rstrip(b" \t\r\n")
    close = {b"{"[0]: b"}", b"["[0]: b"]"}.get(head[0]) if head else None
    if close is None:
        return "it does not start with { or ["
    if not tail.endswith(close):
        return f"cut off: it ends with {tail[-20:].decode('utf-8', 'replace')!r}, not the {close.decode()} that closes it"
    return None


def read_json(path: Path) -> tuple[Any, str | None]:
    """(the document, None), or (None, why it does not parse: cut off, not UTF-8, nested past the decoder's depth)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (ValueError, UnicodeDecodeError) as e:
        return None, str(e)[:200]
    except RecursionError:
        return None, "nested too deeply to read"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is incomplete (None when whole): the 8-byte header length, the JSON header (an
    object of tensors, each with two integer ``data_offsets``), and the file size against the largest end offset."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size < 8:
        return f"truncated ({size} bytes, not even the header length)"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return f"truncated ({size} bytes; its header alone says {8 + n})"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            return f"not a safetensors file (its header does not parse: {e})"
        except RecursionError:
            return "not a safetensors file (its header is nested too deeply to read)"
    if not isinstance(header, dict):
        return f"not a safetensors file (its header is a {type(header).__name__}, not an object of tensors)"
    ends = []
    for k, t in header.items():
        if k == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
            return f"not a safetensors file (tensor {k!r} has no two integer data_offsets)"
        ends.append(offsets[1])
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"incomplete: {size} bytes of the {expected} its header describes (a write or copy that stopped midway)"
    if size > expected:
        return f"damaged: {size} bytes, {size - expected} more than its header describes"
    return None


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
        global _ONE_RANK_DUMP
        _ONE_RANK_DUMP = True  # no collective in the callbacks' save hooks: the other ranks are not here
        try:
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        finally:
            _ONE_RANK_DUMP = False
        state["nonfinite"] = info
        atomic_torch_save(state, path)
        return path
    except Exception as e:  # the guard's own error message matters more than the post-mortem file
        log.warning("could not write the inspection checkpoint %s: %s", path, e)
        return None
