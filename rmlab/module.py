"""RewardModule: the LightningModule (the *system*) around a RewardModel and a pluggable loss.

One shared step for train, val and test; what watches the steps (the non-finite guard, the gradient norm, the
val report's metrics) lives in rmlab.callbacks. Metrics are torchmetrics objects, one set per stage, logged
as objects so that DDP syncs their state. Names are ``stage/name``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, Metric

from rmlab.losses.base import LossOutput, RewardLoss
from rmlab.models.base import RewardModel

STAGES = ("train", "val", "test")
METRICS = ("loss", "acc", "tie_rate", "reward_chosen", "reward_rejected", "reward_gap")


class MeanOnDevice(Metric):
    """A weighted mean whose update reads nothing back from the device (torchmetrics' MeanMetric checks for
    NaN with ``if nans.any()``, a host sync every step). NaN values are left out, as MeanMetric's default
    does, by zeroing their weight on the device. The value reaches the host when Lightning logs it."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value, dtype=torch.float32, device=self.total.device).reshape(-1)
        weight = torch.broadcast_to(torch.as_tensor(weight, dtype=torch.float32, device=self.total.device), value.shape)
        keep = ~torch.isnan(value)
        self.total += torch.where(keep, value * weight, 0.0).sum()
        self.weight += torch.where(keep, weight, 0.0).sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


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


def fused_adamw(params) -> dict[str, bool]:
    """``fused=True`` when every parameter is on a CUDA device (one kernel for the whole update instead of
    several per tensor). On CPU ``foreach=True``: the same arithmetic as PyTorch's CPU default (the per-tensor
    loop), bitwise (tests/test_optim.py), a third faster on a 4.3M-parameter model; fused is not bitwise there,
    so CPU results stay as they were."""
    devices = {p.device.type for p in params}
    if devices == {"cuda"}:
        return {"fused": True}
    return {"foreach": True} if devices == {"cpu"} else {}


@dataclass
class StepOutput:
    """What one step computed, for the callbacks that watch steps (rmlab.callbacks): nothing is recomputed."""

    loss: torch.Tensor  # detached
    rewards: torch.Tensor  # [N] detached
    batch: Any
    stage: str  # train | val | test


def model_state(state: dict) -> dict:
    """The reward model's own entries of a RewardModule state dict (it stores the model as ``model``; the
    loss may own buffers, which are not the model's)."""
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


# The module's on_before_batch_transfer (host-side checks, above) is meant to run with rmlab's datamodule, which has
# none of its own: Lightning's notice that the module's hook is the one used says nothing the user must act on.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")


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
        if loss.required_outputs:  # e.g. GRM's response log-probs, ODIN's two heads: refused here if the model lacks them
            model.require_outputs(loss.required_outputs)
        # ModuleDict keys cannot shadow nn.Module attributes (`train`), hence the suffix.
        self.metrics = nn.ModuleDict({f"{s}_": nn.ModuleDict({m: MeanOnDevice() for m in METRICS}) for s in STAGES})
        self.val_acc_best = MaxMetric()
        self.last_step: StepOutput | None = None  # the last step's loss, rewards and batch (for the callbacks)
        self.last_val_step = -1  # the global step of the last full validation (rmlab.train validates again if stale)

    def forward(self, batch) -> torch.Tensor:
        return self.model.score_batch(batch)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """The loss's checks of the batch's values (a margin source's range) and the model's data-dependent indices
        (GRM's LM targets) are made here, on the collated host copy, before the batch goes to the device: the
        step then reads nothing back for them."""
        if hasattr(batch, "host_checked") and not batch.host_checked:
            self.loss_fn.check_batch(batch)
            batch.host_checked = True
            batch = self.model.prepare_batch(batch)
        return batch

    def shared_step(self, batch, stage: str) -> torch.Tensor:
        if self.loss_fn.needs_heads:
            # The loss also reads the model's extra outputs (attributes, ODIN's heads, GRM's response log-probs),
            # checked at construction (require_outputs).
            if not self.model.extra_outputs:
                raise ValueError(f"loss {type(self.loss_fn).__name__} needs a model with extra outputs "
                                 f"({', '.join(self.loss_fn.required_outputs) or 'e.g. model.head=attributes'})")
            rewards, heads = self.model.score_heads(batch)
            out: LossOutput = self.loss_fn(rewards, batch, heads=heads)
        else:
            rewards = self(batch)
            out = self.loss_fn(rewards, batch)
        # Read by the callbacks: EvalMetricsCallback (the val metrics, no second forward) and NonFiniteGuard.
        self.last_step = StepOutput(out.loss.detach(), rewards.detach(), batch, stage)
        n = max(batch.num_comparisons, 1)
        m = self.metrics[f"{stage}_"]
        on_step = stage == "train"
        m["loss"](out.loss.detach(), n)
        self.log(f"{stage}/loss", m["loss"], on_step=on_step, on_epoch=True, prog_bar=True, batch_size=n)
        for name, v in out.parts.items():  # add-ons such as the centering penalty, logged apart
            self.log(f"{stage}/{name}", v, on_step=on_step, on_epoch=True, batch_size=n)
        if batch.num_comparisons:
            # Counted on the host (collate): a step never waits for the device to say whether a weight is nonzero.
            n_ties = getattr(batch, "n_ties", None)
            for name, (v, w) in pairwise_stats(rewards, batch).items():
                if name == "tie_rate" or (n_ties < batch.num_comparisons if n_ties is not None else w.sum() > 0):
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

    def on_validation_epoch_end(self):
        self.last_val_step = self.global_step
        acc = self.metrics["val_"]["acc"].compute()
        if not torch.isnan(acc):
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # FSDP shards the gradients: Lightning refuses norm clipping there, FSDP's own clip_grad_norm_ takes the
        # global norm across shards.
        wrapped = self.trainer.model if self._trainer is not None else None
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm" and hasattr(wrapped, "clip_grad_norm_"):
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed at once. Lightning zeroes them only inside the next step's
        closure, after that step's forward, so the forward (the activation peak) would also hold a full set of
        the last step's gradients: one more copy of the parameters' bytes, on the host on CPU. TRL's trainer
        frees them after the step, as here. The next backward starts from None either way: same values."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

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
            **fused_adamw(self.parameters()),
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
