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


def reward_stats(module, dm) -> dict[str, float]:
    """Mean and std of rewards over the val responses, stored in the export for normalization."""
    import torch
    from lightning.fabric.utilities.apply_func import move_data_to_device

    module.eval()
    vals = []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            vals.append(module(move_data_to_device(batch, module.device)).float().cpu())
    if not vals:
        return {}
    r = torch.cat(vals)
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 1.0, "reward_n": int(r.numel())}


def start_run(cfg: DictConfig, resolve: bool = True) -> tuple[Path, float]:
    """What every entry (train, eval) does first: quiet transformers, the run dir, threads, the config."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.time()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        from rmlab.checkpoint import ResumeState, checkpoint_plugins, resolve_ckpt_path

        # `last` = this run dir's newest checkpoint (or a fresh start): one command for launch and requeue.
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out)
        # RNG states + CSV rows kept in step with checkpoints: exact resume.
        callbacks.append(ResumeState(resuming_loggers=loggers if ckpt_path else ()))
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
    if trainer.is_global_zero:
        if hasattr(model, "head_report"):  # judge position bias, attribute correlations (rmlab.heads, rmlab.generative)
            summary["head_report"] = model.head_report(dm.val_dataloader())
        if cfg.get("export", True):
            stats = reward_stats(module, dm)
            from rmlab.lora import merge_lora, peft_of

            if peft_of(model) is not None:
                # The adapter (with the head, via modules_to_save) is kept; the export is merged, plain transformers.
                summary["adapter_dir"] = str(merge_lora(model, out / "adapter"))
            summary["export_dir"] = str(model.save_pretrained(out / "export", extra=stats))
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
    lines.append("  next: python eval.py ckpt_path=<run dir>/checkpoints/last.ckpt, or load the export with AutoModelForSequenceClassification")
    return "\n".join(lines)
