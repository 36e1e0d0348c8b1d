"""Callbacks that watch the steps: the eval report's metrics during validation (and wandb dashboards), the
non-finite guard, the gradient norm.

``EvalMetricsCallback`` collects the rewards that the module's shared step already computed
(``pl_module.last_step``: no second forward), then at the end of each validation epoch logs every
scalar of ``rmlab.metrics.compute_all`` as ``val/<name>`` (``val/ece``, ``val/brier``,
``val/bucket_strength/3``, ``val/length/pearson``, ``val/rank/kendall_tau``, ``val/truth/acc``, ...).
With a ``WandbLogger`` it also logs reward histograms of chosen and rejected, the reliability diagram
as an image, and a table of the worst-scored comparisons (prompt, chosen, rejected, rewards).

Under DDP (and FSDP, DeepSpeed) each rank scores its own share of the val groups. At the end of the
epoch every rank's predictions are gathered to every rank (``all_gather_object``) and concatenated, so each
``val/*`` metric is the one a single process would compute over the whole val set, and is the same on
every rank. The gathered predictions of the last validation are kept (``last_pred``, ``last_step``):
``final_val_rewards`` hands them to the export's reward mean/std.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch

from rmlab.checkpoint import save_inspection_checkpoint
from rmlab.metrics import EvalResult, PredictionCollector, Predictions, compute_all, concat_predictions
from rmlab.report import reliability_figure, worst_comparisons
from rmlab.strategies import deepspeed_stage

log = logging.getLogger("rmlab")

# The module logs these itself (synced torchmetrics); logging them again would clash.
_MODULE_OWNS = {"acc", "tie_rate"}


class EvalMetricsCallback(L.Callback):
    def __init__(self, n_bins: int = 10, worst_k: int = 20, wandb_media: bool = True):
        self.n_bins, self.worst_k, self.wandb_media = n_bins, worst_k, wandb_media
        self.collector: PredictionCollector | None = None
        self.last: EvalResult | None = None
        self.last_pred: Predictions | None = None  # all ranks' predictions of the last validation
        self.last_step: int | None = None  # the global step they were scored at

    @staticmethod
    def _wandb_loggers(trainer) -> list:
        return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        # Token ids are kept only when a wandb table will show the worst comparisons.
        keep = self.wandb_media and bool(self._wandb_loggers(trainer))
        self.collector = PredictionCollector(keep_tokens=keep)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        step = pl_module.last_step
        if trainer.sanity_checking or self.collector is None or step is None:
            return
        self.collector.add(step.rewards, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:  # the same on every rank, so no rank skips the gather below alone
            return
        pred = (self.collector or PredictionCollector()).result()
        self.collector = None
        # Every rank joins the gather, even one that scored no batch: a rank that returned early would
        # leave the others waiting in the collective.
        pred = gather_predictions(trainer, pred)
        self.last_pred, self.last_step = pred, trainer.global_step
        if pred.winner.size == 0:
            return
        self.last = res = compute_all(pred, n_bins=self.n_bins)
        for k, v in res.scalars.items():
            if k in _MODULE_OWNS or k.startswith("n_") or k.endswith("/n_groups") or math.isnan(v):
                continue
            # The same value on every rank (all ranks' predictions). The max over ranks is that value exactly, and
            # syncing tells Lightning so (it warns about unsynced epoch-level values); every rank logs these keys.
            pl_module.log(f"val/{k}", float(v), sync_dist=True, reduce_fx="max")
        if self.wandb_media and trainer.is_global_zero:
            for lg in self._wandb_loggers(trainer):
                try:
                    self._log_wandb(lg, trainer, pl_module, pred, res)
                except Exception as e:  # a dashboard must never stop training
                    log.warning("wandb media logging failed: %s", e)

    def _log_wandb(self, lg: Any, trainer, pl_module, pred: Predictions, res: EvalResult) -> None:
        import wandb


        nt = ~pred.tie
        fig = reliability_figure(res.tables["reliability"])
        worst = worst_comparisons(pred, pl_module.model.tokenizer, self.worst_k)
        cols = ["group_id", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"]
        payload = {
            "val/reward_chosen_hist": wandb.Histogram(pred.rw[nt]),
            "val/reward_rejected_hist": wandb.Histogram(pred.rl[nt]),
            "val/reliability_diagram": wandb.Image(fig),
            "val/worst_comparisons": wandb.Table(columns=cols, data=[[w[c] for c in cols] for w in worst]),
            "trainer/global_step": trainer.global_step,
        }
        lg.experiment.log(payload)
        import matplotlib.pyplot as plt

        plt.close(fig)


def gather_predictions(trainer, pred: Predictions) -> Predictions:
    """Every rank's predictions concatenated in rank order, on every rank. A collective when the trainer runs
    more than one process: every rank must call it, the same number of times."""
    import torch.distributed as dist

    if getattr(trainer, "world_size", 1) <= 1 or not (dist.is_available() and dist.is_initialized()):
        return pred
    parts: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(parts, pred)
    return concat_predictions(parts)


def final_val_rewards(trainer) -> Any:
    """The rewards of every val response, over all ranks, from the last validation, when it scored the final
    weights (``EvalMetricsCallback`` gathers them); None without that callback or when they are stale."""
    for cb in trainer.callbacks:
        if isinstance(cb, EvalMetricsCallback) and cb.last_pred is not None and cb.last_step == trainer.global_step:
            return cb.last_pred.reward
    return None


class NonFiniteGuard(L.Callback):
    """Stop on a NaN/inf loss or reward, naming the step and the batch's prompts (rmlab.train always adds it).

    Training: the check is made on the device inside the step (before the backward: a flag, no read-back, so
    the GPU never waits for the host) and read once the step is over, in ``on_train_batch_end``, before any
    checkpoint of this step (Lightning runs checkpoint callbacks last). With a fused optimizer (AdamW on CUDA,
    rmlab.module.fused_adamw) the flag is handed to the optimizer as ``found_inf``, as torch's GradScaler does,
    so the bad step's update is skipped on the device; with the CPU's foreach AdamW the update has happened
    (its weights are what a non-finite gradient made them). The state is saved to ``nonfinite-step<N>.ckpt``
    for a post-mortem, N the step that went bad, and the last good checkpoint is untouched. Under DDP every rank
    decides together each step (train batches are even across ranks), so no rank is left alone in the next
    all-reduce. Val/test batches may be uneven across ranks: no collective per step; the first bad batch is
    kept and every rank decides together at the epoch's end.
    """

    def __init__(self):
        self._eval_bad = None  # the first non-finite val/test StepOutput of this epoch, under DDP
        self._train = None  # (device flag, StepOutput, global step) of the step in flight
        self._skip_set = None  # the optimizer given found_inf for this step

    @staticmethod
    def bad_flag(step) -> torch.Tensor:
        """True (a 0-d bool tensor on the step's device) when the loss or a reward is not finite: no read-back."""
        return ~(torch.isfinite(step.loss) & torch.isfinite(step.rewards).all())

    @classmethod
    def is_bad(cls, step) -> bool:
        return bool(cls.bad_flag(step))

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        step = pl_module.last_step
        self._train = (self.bad_flag(step), step, trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._train is not None and _fused(optimizer) and not hasattr(optimizer, "found_inf"):
            # The fused kernel skips the update (and its step count) where found_inf is 1, on the device. A
            # GradScaler (fp16) sets its own found_inf for the step and removes it; it already skips inf steps.
            optimizer.found_inf = self._train[0].to(torch.float32)
            self._skip_set = optimizer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = getattr(self, "_skip_set", None)
        if opt is not None:
            if hasattr(opt, "found_inf"):
                del opt.found_inf
            self._skip_set = None
        if self._train is None:
            return
        flag, step, gstep = self._train
        self._train = None
        bad = bool(flag)  # the step's one read-back, after its optimizer step
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            stop_on_nonfinite(trainer, step, gstep)

    def _eval_batch_end(self, trainer, pl_module) -> None:
        step = pl_module.last_step
        if step is None:
            return
        if self.is_bad(step):
            if trainer.world_size <= 1:
                stop_on_nonfinite(trainer, step)
            elif self._eval_bad is None:
                self._eval_bad = step

    def _eval_epoch_end(self, trainer) -> None:
        if trainer.world_size <= 1:
            return
        seen, self._eval_bad = self._eval_bad, None
        if trainer.strategy.reduce_boolean_decision(seen is not None, all=False):
            if seen is None:
                raise FloatingPointError("non-finite val/test loss or rewards on another rank; see its message")
            stop_on_nonfinite(trainer, seen)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._eval_epoch_end(trainer)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._eval_epoch_end(trainer)


def _fused(optimizer) -> bool:
    return any(g.get("fused") for g in getattr(optimizer, "param_groups", ()))


def stop_on_nonfinite(trainer, step, global_step: int | None = None) -> None:
    """Raise FloatingPointError naming the stage, step and prompt ids; a train step's state is saved first.
    ``global_step``: the step that went bad, when the check is read after its optimizer step."""
    ids = list(step.batch.group_ids)
    gstep = trainer.global_step if global_step is None else global_step
    bad = int((~torch.isfinite(step.rewards)).sum())
    info = {"stage": step.stage, "global_step": gstep, "group_ids": ids, "loss": float(step.loss),
            "nonfinite_rewards": bad}
    saved = ""
    if step.stage == "train":
        path = save_inspection_checkpoint(trainer, f"nonfinite-step{gstep}.ckpt", info)
        saved = f" State saved for inspection: {path}; the last good checkpoint is untouched." if path else ""
    shown = ", ".join(map(str, ids[:32])) + (f" ... ({len(ids) - 32} more)" if len(ids) > 32 else "")
    raise FloatingPointError(
        f"non-finite {step.stage} loss ({float(step.loss)}) or rewards ({bad} of {step.rewards.numel()} non-finite) "
        f"at global step {gstep}; prompt ids in the batch: [{shown}].{saved} "
        "Lower module.lr, check margins and data, or use trainer.precision=32-true"
    )


class GradNormMonitor(L.Callback):
    """Logs ``train/grad_norm``, the global L2 norm before clipping: spikes here flag bad pairs or a too-high lr
    before the loss does (rmlab.train always adds it)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norm = grad_norm(trainer, pl_module)
        if norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)


def grad_norm(trainer, pl_module) -> torch.Tensor | None:
    """The L2 norm of all gradients, over every rank's shard; None when it cannot be read here.

    - One process, or DDP: the gradients are whole on each rank (DDP all-reduced them), so the local norm
      is the global one and no collective is needed.
    - FSDP: each rank holds a shard of the gradients. FSDP's own ``clip_grad_norm_`` all-reduces the
      shards' sums of squares (hybrid sharding counted once); with an infinite max norm it clips nothing.
      Every rank runs this hook, so every rank joins that all-reduce.
    - DeepSpeed ZeRO keeps the reduced gradients in its own partitioned buffers, not in ``p.grad``:
      there is no norm to read before its step, so none is logged.
    """
    wrapped = trainer.model if trainer is not None else None
    if hasattr(wrapped, "clip_grad_norm_"):
        return wrapped.clip_grad_norm_(float("inf")).detach().float()
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__ == "DeepSpeedStrategy" and deepspeed_stage(strategy) >= 1:
        return None
    norms = [p.grad.detach().float().norm(2) for p in pl_module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms), 2) if norms else None
