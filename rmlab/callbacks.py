"""The eval report's metrics during validation, logged as ``val/...``, and wandb dashboards.

``EvalMetricsCallback`` collects the rewards that the module's shared step already computed
(``pl_module.last_rewards``: no second forward), then at the end of each validation epoch logs every
scalar of ``rmlab.metrics.compute_all`` as ``val/<name>`` (``val/ece``, ``val/brier``,
``val/bucket_strength/3``, ``val/length/pearson``, ``val/rank/kendall_tau``, ``val/truth/acc``, ...).
With a ``WandbLogger`` it also logs reward histograms of chosen and rejected, the reliability diagram
as an image, and a table of the worst-scored comparisons (prompt, chosen, rejected, rewards).

Under DDP each rank sees its own share of the val groups; these extra metrics are computed on rank
0's share (the module's own ``val/acc`` and ``val/loss`` are synced torchmetrics).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L

from rmlab.metrics import EvalResult, PredictionCollector, Predictions, compute_all

log = logging.getLogger("rmlab")

# The module logs these itself (synced torchmetrics); logging them again would clash.
_MODULE_OWNS = {"acc", "tie_rate"}


class EvalMetricsCallback(L.Callback):
    def __init__(self, n_bins: int = 10, worst_k: int = 20, wandb_media: bool = True):
        self.n_bins, self.worst_k, self.wandb_media = n_bins, worst_k, wandb_media
        self.collector: PredictionCollector | None = None
        self.last: EvalResult | None = None

    @staticmethod
    def _wandb_loggers(trainer) -> list:
        return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        # Token ids are kept only when a wandb table will show the worst comparisons.
        keep = self.wandb_media and bool(self._wandb_loggers(trainer))
        self.collector = PredictionCollector(keep_tokens=keep)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rewards = getattr(pl_module, "last_rewards", None)
        if trainer.sanity_checking or self.collector is None or rewards is None:
            return
        self.collector.add(rewards, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.collector is None or len(self.collector) == 0:
            return
        pred = self.collector.result()
        self.collector = None
        if pred.winner.size == 0:
            return
        self.last = res = compute_all(pred, n_bins=self.n_bins)
        for k, v in res.scalars.items():
            if k in _MODULE_OWNS or k.startswith("n_") or k.endswith("/n_groups") or math.isnan(v):
                continue
            pl_module.log(f"val/{k}", float(v), sync_dist=False, rank_zero_only=True)
        if self.wandb_media and trainer.is_global_zero:
            for lg in self._wandb_loggers(trainer):
                try:
                    self._log_wandb(lg, trainer, pl_module, pred, res)
                except Exception as e:  # a dashboard must never stop training
                    log.warning("wandb media logging failed: %s", e)

    def _log_wandb(self, lg: Any, trainer, pl_module, pred: Predictions, res: EvalResult) -> None:
        import wandb

        from rmlab.report import reliability_figure, worst_comparisons

        nt = ~pred.tie
        fig = reliability_figure(res.tables["reliability"])
        worst = worst_comparisons(pred, getattr(pl_module.model, "tokenizer", None), self.worst_k)
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
