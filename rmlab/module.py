"""RewardModule: the LightningModule (the *system*) around a RewardModel and a pluggable loss.

One shared step for train, val and test. Metrics are torchmetrics objects, one set per stage, logged
as objects so that DDP syncs their state. Names are ``stage/name``.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric

from rmlab.checkpoint import save_inspection_checkpoint
from rmlab.losses.base import LossOutput, RewardLoss
from rmlab.models.base import RewardModel
from rmlab.strategies import deepspeed_stage

STAGES = ("train", "val", "test")
METRICS = ("loss", "acc", "tie_rate", "reward_chosen", "reward_rejected", "reward_gap")


def pairwise_stats(rewards: torch.Tensor, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(values, weights) per metric for one batch. Accuracy is strict (r_w > r_l) on non-tie
    comparisons only; ties are reported as a rate, never counted as wins."""
    rw, rl = rewards[batch.winner].detach(), rewards[batch.loser].detach()
    nt = ~batch.tie
    ones = torch.ones_like(rw)
    return {
        "acc": ((rw > rl).float(), nt.float()),
        "tie_rate": (batch.tie.float(), ones),
        "reward_chosen": (rw, nt.float()),
        "reward_rejected": (rl, nt.float()),
        "reward_gap": (rw - rl, nt.float()),
    }


def model_state(state: dict) -> dict:
    """The reward model's own entries of a RewardModule state dict (it stores the model as ``model``; the
    loss may own buffers, which are not the model's)."""
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


class RewardModule(L.LightningModule):
    def __init__(
        self,
        model: RewardModel,
        loss: RewardLoss,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.1,
        scheduler: str = "cosine",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "loss"])
        self.model, self.loss_fn = model, loss
        # ModuleDict keys cannot shadow nn.Module attributes (`train`), hence the suffix.
        self.metrics = nn.ModuleDict({f"{s}_": nn.ModuleDict({m: MeanMetric() for m in METRICS}) for s in STAGES})
        self.val_acc_best = MaxMetric()
        self.last_rewards = None  # the last step's rewards, read by rmlab.callbacks.EvalMetricsCallback
        self.last_val_step = -1  # the global step of the last full validation (rmlab.train validates again if stale)
        self._eval_nonfinite = None  # (loss, rewards, batch, stage) of the first non-finite val/test batch under DDP

    def forward(self, batch) -> torch.Tensor:
        return self.model.score_batch(batch)

    def shared_step(self, batch, stage: str) -> torch.Tensor:
        if self.loss_fn.needs_heads:
            # Multi-output heads (rmlab.models.attributes): the loss also trains the per-attribute outputs.
            if not self.model.extra_outputs:
                raise ValueError(f"loss {type(self.loss_fn).__name__} needs a multi-output head (model.head=attributes)")
            rewards, heads = self.model.score_heads(batch)
            out: LossOutput = self.loss_fn(rewards, batch, heads=heads)
        else:
            rewards = self(batch)
            out = self.loss_fn(rewards, batch)
        self.last_rewards = rewards.detach()  # read by rmlab.callbacks.EvalMetricsCallback: no second forward
        bad = not bool(torch.isfinite(out.loss) and torch.isfinite(rewards).all())
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if distributed and stage != "train":
            # Val/test batches may be uneven across ranks: no collective per step. The first bad batch is
            # kept and every rank decides together at the end of the epoch (``_stop_if_eval_nonfinite``).
            if bad and self._eval_nonfinite is None:
                self._eval_nonfinite = (out.loss.detach(), rewards.detach(), batch, stage)
            bad = False
        elif distributed:
            # Train batches are even across ranks (the sampler): all ranks stop together; a rank that raised
            # alone would leave the others in the next all-reduce.
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self.stop_on_nonfinite(out.loss, rewards, batch, stage)
        n = max(batch.num_comparisons, 1)
        m = self.metrics[f"{stage}_"]
        on_step = stage == "train"
        m["loss"](out.loss.detach(), n)
        self.log(f"{stage}/loss", m["loss"], on_step=on_step, on_epoch=True, prog_bar=True, batch_size=n)
        for name, v in out.parts.items():  # add-ons such as the centering penalty, logged apart
            self.log(f"{stage}/{name}", v, on_step=on_step, on_epoch=True, batch_size=n)
        if batch.num_comparisons:
            for name, (v, w) in pairwise_stats(rewards, batch).items():
                if w.sum() > 0:
                    m[name](v, w)
                self.log(f"{stage}/{name}", m[name], on_step=on_step and name == "acc", on_epoch=True,
                         prog_bar=name == "acc", batch_size=n)
        return out.loss

    def training_step(self, batch, batch_idx):
        return self.shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.shared_step(batch, "test")

    def _stop_if_eval_nonfinite(self) -> None:
        """Under DDP, a non-finite val/test batch on any rank stops every rank, at the epoch's end."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return
        seen, self._eval_nonfinite = self._eval_nonfinite, None
        if self.trainer.strategy.reduce_boolean_decision(seen is not None, all=False):
            if seen is None:
                raise FloatingPointError("non-finite val/test loss or rewards on another rank; see its message")
            self.stop_on_nonfinite(*seen)

    def on_test_epoch_end(self):
        self._stop_if_eval_nonfinite()

    def on_validation_epoch_end(self):
        self._stop_if_eval_nonfinite()
        self.last_val_step = self.global_step
        acc = self.metrics["val_"]["acc"].compute()
        if not torch.isnan(acc):
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=False)

    def stop_on_nonfinite(self, loss: torch.Tensor, rewards: torch.Tensor, batch, stage: str) -> None:
        """Stop on a NaN/inf loss or reward, naming the step and the batch's prompts. The state is saved to
        ``nonfinite-step<N>.ckpt`` for a post-mortem; the last good checkpoint is untouched, since this raises
        before the step's update and before any checkpoint of this step."""
        step, ids = self.global_step, list(batch.group_ids)
        bad = int((~torch.isfinite(rewards.detach())).sum())
        info = {"stage": stage, "global_step": step, "group_ids": ids, "loss": float(loss.detach()), "nonfinite_rewards": bad}
        saved = ""
        if stage == "train" and self._trainer is not None:
            path = save_inspection_checkpoint(self.trainer, f"nonfinite-step{step}.ckpt", info)
            saved = f" State saved for inspection: {path}; the last good checkpoint is untouched." if path else ""
        shown = ", ".join(map(str, ids[:32])) + (f" ... ({len(ids) - 32} more)" if len(ids) > 32 else "")
        raise FloatingPointError(
            f"non-finite {stage} loss ({float(loss.detach())}) or rewards ({bad} of {rewards.numel()} non-finite) "
            f"at global step {step}; prompt ids in the batch: [{shown}].{saved} "
            "Lower module.lr, check margins and data, or use trainer.precision=32-true"
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # FSDP shards the gradients: Lightning refuses norm clipping there, FSDP's own clip_grad_norm_ takes the
        # global norm across shards.
        wrapped = self.trainer.model if self._trainer is not None else None
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm" and hasattr(wrapped, "clip_grad_norm_"):
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        # The global L2 norm before clipping: spikes here flag bad pairs or a too-high lr before the loss does.
        norm = self.grad_norm()
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def grad_norm(self) -> torch.Tensor | None:
        """The L2 norm of all gradients, over every rank's shard; None when it cannot be read here.

        - One process, or DDP: the gradients are whole on each rank (DDP all-reduced them), so the local norm
          is the global one and no collective is needed.
        - FSDP: each rank holds a shard of the gradients. FSDP's own ``clip_grad_norm_`` all-reduces the
          shards' sums of squares (hybrid sharding counted once); with an infinite max norm it clips nothing.
          Every rank runs this hook, so every rank joins that all-reduce.
        - DeepSpeed ZeRO keeps the reduced gradients in its own partitioned buffers, not in ``p.grad``:
          there is no norm to read before its step, so none is logged.
        """
        wrapped = self.trainer.model if self._trainer is not None else None
        if hasattr(wrapped, "clip_grad_norm_"):
            return wrapped.clip_grad_norm_(float("inf")).detach().float()
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if type(strategy).__name__ == "DeepSpeedStrategy" and deepspeed_stage(strategy) >= 1:
            return None
        norms = [p.grad.detach().float().norm(2) for p in self.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms), 2) if norms else None

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # Biases and norm weights (1-D) get no weight decay.
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            eps=self.hparams.eps,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(self.hparams.warmup_ratio * total)
        floor, kind = self.hparams.min_lr_ratio, self.hparams.scheduler

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            if kind == "constant":
                return 1.0
            t = min(1.0, (step - warm) / max(1, total - warm))
            shape = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1 - t
            return floor + (1 - floor) * shape

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
