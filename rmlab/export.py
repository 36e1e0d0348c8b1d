"""The export: the trained model as a Hugging Face directory that plain transformers loads.

``export_model`` merges LoRA adapters (the adapter folder is kept beside), writes the weights as safetensors
with the tokenizer, and records in ``config.rmlab`` the head and the reward mean/std of the val set (also
as ``config.mean`` / ``config.std``, which OpenRLHF's ``--normalize_reward`` reads).

Under sharded strategies the weights must first be whole in one process (``whole_model``): FSDP gathers them
to rank 0; DeepSpeed ZeRO-3 is refused with what to do instead (``ExportRefused``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from rmlab import strategies
from rmlab.models.base import RewardModel
from rmlab.models.lora import merge_lora, peft_of
from rmlab.models.scoring import score_batches
from rmlab.module import model_state


class ExportRefused(RuntimeError):
    """The weights are sharded in a way rmlab cannot gather for the export."""


def gather_full_state_dict(trainer) -> dict:
    """The LightningModule's full state dict on rank 0 (CPU), empty on the other ranks. An FSDP collective:
    every rank must call it."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(trainer.model, StateDictType.FULL_STATE_DICT, config):
        return trainer.model.state_dict()


def whole_model(trainer, module, cfg: DictConfig) -> RewardModel | None:
    """The trained model with all its weights in this process, for the export (call on every rank).

    - Whole weights on every rank (one device, DDP, DeepSpeed ZeRO-1/2): ``module.model`` itself.
    - FSDP sharding: every rank joins the gather of the full state dict to rank 0, which loads it into a
      fresh copy of the model on CPU (room for the model twice in CPU memory); the other ranks get None.
    - DeepSpeed ZeRO-3: raises ExportRefused with what to do instead.
    """
    kind = strategies.weight_sharding(trainer)
    if kind is None:
        return module.model
    if kind == "deepspeed_zero3":
        raise ExportRefused(
            "export=true is not supported under DeepSpeed ZeRO-3: the weights are partitioned across ranks and "
            "rmlab does not gather them. Train with stage 2 (the default of trainer=deepspeed) or trainer=fsdp, or "
            "convert the checkpoint with lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict "
            "and export from it in one process"
        )
    state = gather_full_state_dict(trainer)
    if not trainer.is_global_zero:
        return None
    fresh = instantiate(cfg.model, _convert_="all")
    fresh.load_state_dict(model_state(state), strict=True)
    return fresh.eval()


def reward_stats(rewards: Any) -> dict[str, float]:
    """Mean and std of the rewards of every val response, stored in the export for normalization."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        return {}
    return {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std(ddof=1)) if r.size > 1 else 1.0,
        "reward_n": int(r.size),
    }


def val_rewards(model: RewardModel, loader) -> np.ndarray:
    """The rewards of every response of ``loader`` (one process, the model's device)."""
    parts = [s.rewards.numpy() for s in score_batches(model, loader)]
    return np.concatenate(parts) if parts else np.zeros(0)


def export_model(model: RewardModel, out_dir: Path, stats: dict[str, float]) -> dict[str, str]:
    """Write ``<out_dir>/export`` (LoRA merged; the adapter kept in ``<out_dir>/adapter``). Returns the paths."""
    paths = {}
    if peft_of(model) is not None:
        # The adapter (with the head, via modules_to_save) is kept; the export is merged, plain transformers.
        paths["adapter_dir"] = str(merge_lora(model, out_dir / "adapter"))
    paths["export_dir"] = str(model.save_pretrained(out_dir / "export", extra=stats))
    for d in paths.values():
        follow_umask(Path(d))
    return paths


def follow_umask(folder: Path) -> None:
    """Give every file in ``folder`` the permissions of the process's umask, as any other file of the run has.

    safetensors (0.8) writes its file as 0600 whatever the umask: the weights of an export on a shared file system
    were unreadable to the group that could read its config.json. Only widens to what the umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode | want != mode:
                p.chmod(mode | want)
