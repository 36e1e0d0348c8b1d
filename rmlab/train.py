"""The training entry: ``run(cfg)`` does the work; ``train.py`` at the root is a thin Hydra shim.

Tests call ``run`` through Hydra's compose API. Heavy imports (torch, lightning, transformers) happen
inside ``run`` so that ``python train.py --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from rmlab.rundir import claim_run_dir

log = logging.getLogger("rmlab")


def has_wandb_key() -> bool:
    """True when wandb has credentials (env or netrc). Never reads the key out loud."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def run_name_and_group(cfg: DictConfig) -> tuple[str, str]:
    """A run is named by its overrides; the runs of one -m sweep share a group (task + sweep dir)."""
    out = Path(cfg.paths.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        name = hc.job.override_dirname or out.name
        group = f"{cfg.task_name}/{Path(hc.sweep.dir).name}" if hc.mode == RunMode.MULTIRUN else cfg.task_name
    except ValueError:  # called outside a Hydra app (tests, notebooks)
        name, group = out.name, cfg.task_name
    return name, group


def build_loggers(cfg: DictConfig) -> list:
    from hydra.utils import instantiate

    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if lcfg is None or "_target_" not in lcfg:
            continue
        if "wandb" in lcfg._target_.lower():
            with open_dict(lcfg):
                if lcfg.get("offline") is None:
                    # No key: run offline, never prompt, never hang. `wandb sync` uploads later.
                    lcfg.offline = not has_wandb_key()
                if lcfg.get("id") is None:
                    from rmlab.checkpoint import wandb_run_id

                    # The id lives in the run dir, so a resumed or requeued run continues the same wandb run.
                    lcfg.id, lcfg.resume = wandb_run_id(cfg.paths.output_dir), "allow"
                name, group = run_name_and_group(cfg)
                if lcfg.get("name") is None:
                    lcfg.name = name  # the overrides that make this run, e.g. "loss=margin,seed=2"
                if lcfg.get("group") is None:
                    lcfg.group = group  # one group per sweep
            os.environ.setdefault("WANDB_SILENT", "true")
            lg = instantiate(lcfg)
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # resolved, never ${...}
            loggers.append(lg)
        else:
            loggers.append(instantiate(lcfg))
    return loggers


def finish_wandb(loggers: list, failed: bool) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                if wandb.run is not None:
                    wandb.finish(exit_code=1 if failed else 0)
            except Exception as e:  # finishing must never mask the run's own error
                log.warning("wandb.finish failed: %s", e)


def reward_stats(model, dm, rewards=None) -> dict[str, float]:
    """Mean and std of the rewards of every val response, stored in the export for normalization.

    ``rewards``: the val rewards of the final weights, already scored on every rank and gathered
    (``final_val_rewards``). Without them, ``model`` (whole weights, in this process) scores the whole val
    set here, never just this rank's share."""
    import numpy as np

    if rewards is None:
        from rmlab.evaluate import score_loader

        model.eval()
        device = next(model.parameters()).device
        rewards = score_loader(model, full_val_loader(dm), device=str(device)).reward
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        return {}
    return {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std(ddof=1)) if r.size > 1 else 1.0,
        "reward_n": int(r.size),
    }


def final_val_rewards(trainer) -> Any:
    """The rewards of every val response, over all ranks, from the last validation, when it scored the final
    weights (``rmlab.callbacks.EvalMetricsCallback`` gathers them); None without that callback."""
    from rmlab.callbacks import EvalMetricsCallback

    for cb in trainer.callbacks:
        if isinstance(cb, EvalMetricsCallback) and cb.last_pred is not None and cb.last_step == trainer.global_step:
            return cb.last_pred.reward
    return None


def full_val_loader(dm):
    """The whole val set in one process. The datamodule shards its loaders by the trainer's rank; detached
    from the trainer it builds a single-process loader."""
    trainer = dm.trainer
    dm.trainer = None
    try:
        return dm.val_dataloader()
    finally:
        dm.trainer = trainer


def weight_sharding(trainer) -> str | None:
    """How the strategy splits the weights across ranks, or None when every rank holds them whole (one device,
    DDP, FSDP NO_SHARD or on one device, DeepSpeed ZeRO-1/2)."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if trainer.world_size <= 1:
        return None
    if name == "FSDPStrategy":
        sharding = getattr(strategy, "sharding_strategy", None)
        return None if getattr(sharding, "name", str(sharding)) == "NO_SHARD" else "fsdp"
    if name == "DeepSpeedStrategy":
        from rmlab.module import deepspeed_stage

        return "deepspeed_zero3" if deepspeed_stage(strategy) >= 3 else None
    return None


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


def whole_model(trainer, module, cfg: DictConfig):
    """The trained RewardModel with all its weights in this process, for the export (call on every rank).

    - Whole weights on every rank (one device, DDP, DeepSpeed ZeRO-1/2): ``module.model`` itself.
    - FSDP sharding: every rank joins the gather of the full state dict to rank 0, which loads it into a
      fresh copy of the model on CPU (room for the model twice in CPU memory); the other ranks get None.
    - DeepSpeed ZeRO-3: raises ExportRefused with what to do instead.
    """
    kind = weight_sharding(trainer)
    if kind is None:
        return module.model
    if kind == "deepspeed_zero3":
        raise ExportRefused(
            "export=true is not supported under DeepSpeed ZeRO-3: the weights are partitioned across ranks and "
            "rmlab does not gather them. Train with stage 2 (the default of trainer=deepspeed) or trainer=fsdp, or "
            "convert the checkpoint with lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict "
            "and export from it in one process"
        )
    from hydra.utils import instantiate

    state = gather_full_state_dict(trainer)
    if not trainer.is_global_zero:
        return None
    fresh = instantiate(cfg.model, _convert_="all")
    # The module stores the RewardModel as `model`; FSDP's full state dict uses the unwrapped names.
    own = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    fresh.load_state_dict(own, strict=True)
    return fresh.eval()


def start_run(cfg: DictConfig, resolve: bool = True) -> tuple[Path, float]:
    """What every entry (train, eval) does first: quiet transformers, the run dir, threads, the config."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.time()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_run_dir(out)  # one live run per dir: another one's dir stops this run with RunDirBusy
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=resolve))
    return out, t0


def run(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import instantiate

    if cfg.seed is not None:  # 0 is a valid seed; seeded before anything draws random numbers
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    out, t0 = start_run(cfg)
    from rmlab.checkpoint import resume_checkpoint  # `last` resolved (intact fallback), checked before the model builds

    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), out, cfg.model)
    model = instantiate(cfg.model, _convert_="all")
    loss = instantiate(cfg.loss, _convert_="all")
    # Generative models re-template each group into their own rows (rmlab.generative.GroupTemplate).
    dm = instantiate(cfg.data, tokenizer=model.tokenizer, output_dir=str(out), template=getattr(model, "group_template", None),
                     _convert_="all")
    module = instantiate(cfg.optim, model=model, loss=loss, _convert_="all")
    loggers = build_loggers(cfg)
    failed = True
    try:  # from here on, wandb is finished whatever fails (callbacks, trainer, data, training)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
        from rmlab.checkpoint import ResumeState, checkpoint_plugins

        # RNG states + CSV rows kept in step with checkpoints: exact resume; the model config in each checkpoint.
        # First, so the RNG is restored before any other callback's on_train_batch_start draws from it.
        callbacks.insert(0, ResumeState(resuming_loggers=loggers if ckpt_path else (), model_cfg=cfg.model))
        plugins = checkpoint_plugins(cfg.trainer)  # atomic checkpoint files
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(out),
                              **({"plugins": plugins} if plugins else {}))
        dm.setup("fit")
        if trainer.is_global_zero:
            for line in dm.report["one_line"]:
                print(line, flush=True)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        if "val/acc" not in trainer.callback_metrics or getattr(module, "_last_val_step", -1) != trainer.global_step:
            # max_steps can stop mid-epoch before validation: score the final weights once.
            trainer.validate(module, datamodule=dm, verbose=False)
        failed = False
    finally:
        finish_wandb(loggers, failed)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    base = dm.report.get("val_baselines", {})
    summary = {
        "run_dir": str(out),
        "val_acc": metrics.get("val/acc", float("nan")),
        "oracle_acc": base.get("oracle_acc", float("nan")),
        "length_acc": base.get("length_acc", float("nan")),
        "train_steps": int(trainer.global_step),
        "minutes": (time.time() - t0) / 60,
        "metrics": metrics,
    }
    # Every rank runs this part: under FSDP sharding, gathering the weights for the export is a collective.
    # The val rewards behind the export's statistics were gathered from all ranks during the last validation.
    export = bool(cfg.get("export", True))
    whole = None
    if export:
        try:
            whole = whole_model(trainer, module, cfg)
        except ExportRefused as e:
            log.error("%s", e)
            summary["export_skipped"] = str(e)
            export = False
    if trainer.is_global_zero:
        if hasattr(model, "head_report"):  # judge position bias, attribute correlations (rmlab.heads, rmlab.generative)
            if weight_sharding(trainer) is None:
                # Over the whole val set, not rank 0's share; rank 0 holds the whole weights.
                summary["head_report"] = model.head_report(full_val_loader(dm))
            else:
                log.info("head report skipped: the weights are sharded; run eval.py on the checkpoint for it")
        if export:
            stats = reward_stats(whole, dm, rewards=final_val_rewards(trainer))
            from rmlab.lora import merge_lora, peft_of

            if peft_of(whole) is not None:
                # The adapter (with the head, via modules_to_save) is kept; the export is merged, plain transformers.
                summary["adapter_dir"] = str(merge_lora(whole, out / "adapter"))
            summary["export_dir"] = str(whole.save_pretrained(out / "export", extra=stats))
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
        print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict) -> str:
    def pct(x):
        return "  n/a " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"

    lines = [
        "",
        "rmlab run finished",
        f"  val accuracy (strict, ties apart) {pct(s['val_acc'])}",
        f"  oracle accuracy (true reward)     {pct(s['oracle_acc'])}",
        f"  length-only baseline              {pct(s['length_acc'])}",
        f"  steps {s['train_steps']}, {s['minutes']:.1f} min",
        f"  run dir: {s['run_dir']}",
    ]
    for k, v in (s.get("head_report") or {}).items():
        lines.append(f"  {k:<33} {v:.3f}")
    if s.get("export_dir"):
        lines.append(f"  exported model (transformers): {s['export_dir']}")
    if s.get("export_skipped"):
        lines.append(f"  export skipped: {s['export_skipped']}")
    lines.append("  next: python eval.py ckpt_path=<run dir>/checkpoints/last.ckpt, or load the export with AutoModelForSequenceClassification")
    return "\n".join(lines)
