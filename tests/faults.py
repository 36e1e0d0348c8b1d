"""Fault injection for the resume, NaN-guard and DDP tests. Added to a run from the command line, e.g.
``python train.py +callbacks.kill._target_=tests.faults.KillAtStep +callbacks.kill.step=12``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch


class KillAtStep(L.Callback):
    """SIGKILL this process when ``global_step`` reaches ``step``: no cleanup, no final checkpoint, no
    flushed buffers, as when a node dies or SLURM preempts without a grace signal."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAtStep(L.Callback):
    """Set the reward head's weights to NaN before optimizer step ``step + 1``, recording the last good
    checkpoint's hash and the batch's prompt ids, so a test can check what the NaN guard left behind."""

    def __init__(self, step: int, record: str):
        self.step, self.record = step, record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        info = {"group_ids": list(batch.group_ids), "last_sha": hashlib.sha256(last.read_bytes()).hexdigest()}
        Path(self.record).write_text(json.dumps(info))
        with torch.no_grad():
            pl_module.model.head.weight.fill_(float("nan"))


class RecordGroups(L.Callback):
    """Each rank appends the prompt ids of its training batches to ``<run dir>/groups_rank<r>.jsonl``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        path = Path(trainer.default_root_dir) / f"groups_rank{trainer.global_rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(list(batch.group_ids)) + "\n")


class PoisonValOnRank(L.Callback):
    """Set the reward head to NaN on one rank only, at its validation batch ``batch``: a non-finite val batch
    that the other rank never sees (val batches may be uneven across ranks, so no per-step collective)."""

    def __init__(self, rank: int = 0, batch: int = 0):
        self.rank, self.batch = rank, batch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            with torch.no_grad():
                pl_module.model.head.weight.fill_(float("nan"))


class KillInValidation(L.Callback):
    """SIGKILL this process in the validation that follows optimizer step ``step`` (at its first batch): after
    the epoch's last training batch and its checkpoint, before the next epoch starts."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.training is False and trainer.state.fn == "fit" and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class WaitForFile(L.Callback):
    """Hold the run at its first training batch until ``path`` exists (at most ``timeout`` seconds), so a test
    can act while the run is alive and owns its run dir."""

    def __init__(self, path: str, timeout: float = 300):
        self.path, self.timeout = path, timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        t0 = time.time()
        while not Path(self.path).exists() and time.time() - t0 < self.timeout:
            time.sleep(0.2)


class RankSkewedRng(L.Callback):
    """Each rank draws ``rank + 1`` extra numbers from torch's RNG before each training batch, so the ranks'
    RNG streams differ (as on GPUs, where each device has its own): a resume that gave every rank rank 0's
    states would draw other dropout masks on rank 1."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.rand(trainer.global_rank + 1)
