"""The two stages of the CLoud recipe (Ankner et al. 2024) in one run, as a Lightning callback.

- Stage 1, epochs ``[0, sft_epochs)``: critique SFT. The critique loss trains the LM head on the data's reference
  critiques; its reward term is reported, not trained (``CritiqueLoss.reward_active = False``).
- Stage 2, the epochs after: the model as it ends stage 1 is frozen as the *critic* (``model.set_critic``), which
  writes every training row's critique (greedy, cached: each row once); the reward is trained on those
  self-generated critiques, together with the LM term on the reference critiques (the paper's joint objective).

The critic's weights are saved in the run dir (``critic.pt``) when stage 2 starts, so a run resumed in stage 2
gets the same critic back. Validation always generates with the model being trained (rmlab.models.reasoning).

Departures from the paper: it regenerates the critiques once, offline, and trains the reward from a fresh copy of
the SFT model; here the critic writes them on first use and the same weights go on training (stage 2 starts
from the SFT weights, as the paper's does).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import torch

from rmlab.losses.critique import CritiqueLoss

log = logging.getLogger("rmlab")
CRITIC_FILE = "critic.pt"


class CritiqueStages(L.Callback):
    def __init__(self, sft_epochs: int = 1):
        if int(sft_epochs) < 0:
            raise ValueError(f"sft_epochs must be >= 0, got {sft_epochs}")
        self.sft_epochs = int(sft_epochs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, loss = pl_module.model, pl_module.loss_fn
        if not model.writes_critiques:  # a baseline in the same recipe (the scalar head): one stage, its reward loss
            return
        stage = 1 if trainer.current_epoch < self.sft_epochs else 2
        if isinstance(loss, CritiqueLoss):
            loss.reward_active = stage == 2
        if stage == 1 or model.critic is not None:
            return
        path = Path(trainer.default_root_dir) / CRITIC_FILE
        critic = model
        if path.exists():  # resumed inside stage 2 (a run dir is one run's): the critic saved when stage 2 began
            critic = copy.deepcopy(model)
            critic.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        elif trainer.is_global_zero:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        model.set_critic(critic)
        log.info("CLoud stage 2 from epoch %d: the reward trains on critiques written by the stage-1 model", trainer.current_epoch)
