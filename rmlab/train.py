"""The training entry: ``run(cfg)`` is the story of a run; ``train.py`` at the root is a thin Hydra shim.

Tests call ``run`` through Hydra's compose API. The root shim imports this module inside its Hydra task, so
``python train.py --help`` never pays for torch, lightning or transformers.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from rmlab import strategies
from rmlab.callbacks import GradNormMonitor, NonFiniteGuard, final_val_rewards
from rmlab.checkpoint import ResumeState, checkpoint_plugins, overwrite_on_resume, resume_checkpoint, resumes_in_place
from rmlab.data.sources import DataError
from rmlab.data.types import RESPONSE_FIELDS
from rmlab.export import ExportRefused, export_model, reward_stats, val_rewards, whole_model
from rmlab.losses.critique import CritiqueLoss
from rmlab.models.budget import token_budget
from rmlab.models.liger import liger_report
from rmlab.models.scoring import score_batches
from rmlab.rundir import nested_job_dir
from rmlab.runtime import Loggers, start_run
from rmlab.summary import eval_args, run_summary, write_summary
from rmlab.validate import check_config

log = logging.getLogger("rmlab")


def build_trainer(cfg: DictConfig, loggers: list, resuming: bool) -> L.Trainer:
    """The Lightning Trainer with the config's callbacks, exact-resume state and atomic checkpoint files."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    # Always on: RNG states + CSV rows + the model config kept in step with checkpoints (exact resume; first, so
    # the RNG is restored before any other callback draws from it), the non-finite guard, the gradient norm.
    resume = ResumeState(resuming_loggers=loggers if resuming else (), model_cfg=cfg.model)
    callbacks = [resume, *callbacks, NonFiniteGuard(), GradNormMonitor()]
    plugins = checkpoint_plugins(cfg.trainer)
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=cfg.paths.output_dir,
        **({"plugins": plugins} if plugins else {}),
    )
    if resuming:
        overwrite_on_resume(trainer)
    return trainer


def check_loss_has_data(loss, dm) -> None:
    """A pointwise or listwise loss (``response_field``: ranks, labels, scores) masks the responses without its
    field, so on data that has none every step's loss is 0 and only weight decay moves the weights. Refuse that run,
    named, before the first step."""
    loss = getattr(loss, "reward_loss", loss)  # CritiqueLoss (a CLoud model): the reward loss it wraps
    name = getattr(loss, "response_field", None)
    if not name or not dm.train_groups:
        return
    group_name = next(f.group_name for f in RESPONSE_FIELDS if f.name == name)
    if any(any(math.isfinite(v) for v in (getattr(g, group_name) or ())) for g in dm.train_groups):
        return
    raise DataError(f"data={dm.records.name}", f"the loss ({type(loss).__name__}) trains on each response's {name} "
                    f"(batch.{name}) and none of the {len(dm.train_groups)} training groups has one, so every step's "
                    "loss would be 0 and only weight decay would move the weights", loss.response_field_hint)


def run(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg, entry="train")  # bad settings fail here, named, before anything loads
    # 1. Seed before anything draws random numbers (0 is a valid seed), then the run dir.
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    out, t0 = start_run(cfg, resuming=resumes_in_place(cfg.get("ckpt_path"), cfg.paths.output_dir))
    # `ckpt_path=last` = this run dir's newest intact checkpoint, or a fresh start (one command for launch and
    # requeue); a checkpoint of another architecture is refused here, before any model loads.
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), out, cfg.model, nested_job_dir(out))

    # 2. The model, its loss, the data (tokenized with the model's tokenizer and, for generative heads, its
    #    template), and the LightningModule that trains the model with the loss.
    model = instantiate(cfg.model, _convert_="all")
    loss = instantiate(cfg.loss, _convert_="all")
    if model.writes_critiques and not loss.needs_heads:  # CLoud with a plain reward loss: the critique LM term joins it
        loss = CritiqueLoss(loss)
    elif isinstance(loss, CritiqueLoss) and not model.writes_critiques:  # loss=cloud on a model that writes nothing
        log.info("model.head=%s writes no critique: loss=cloud trains its reward loss alone", cfg.model.get("head"))
        loss = loss.reward_loss
    dm = instantiate(cfg.data, tokenizer=model.tokenizer, output_dir=str(out), template=model.group_template,
                     _convert_="all")
    dm.layout = model.batch_layout  # the collator builds the model's packed layout (set here: Hydra would convert it)
    if dm.batches.max_tokens == "auto":  # sized to the device by a short memory probe, in packed tokens (rmlab.models.budget)
        dm.batches.max_tokens = token_budget(model, dm.rows.max_length, bf16="bf16" in str(cfg.trainer.get("precision")))
        dm.batches.budget = "packed"
    module = instantiate(cfg.module, model=model, loss=loss, _convert_="all")

    # 3. Fit. Wandb is finished whatever fails from here on.
    run_loggers = Loggers(cfg)
    with run_loggers as loggers:
        trainer = build_trainer(cfg, loggers, resuming=ckpt_path is not None)
        dm.setup("fit")
        if trainer.is_global_zero:
            for line in dm.report["one_line"]:
                print(line, flush=True)
        check_loss_has_data(loss, dm)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        if "val/acc" not in trainer.callback_metrics or module.last_val_step != trainer.global_step:
            # max_steps can stop mid-epoch before validation: score the final weights once.
            trainer.validate(module, datamodule=dm, verbose=False)

    # 4. The summary, the model's own report and the export. Every rank runs this part: under FSDP sharding,
    #    gathering the weights for the export is a collective.
    summary = run_summary(trainer, out, (time.time() - t0) / 60, dm.report.get("val_baselines", {}))
    summary["eval_args"] = eval_args(cfg)  # the next: line's eval.py scores this run's data and val split
    if run_loggers.wandb_offline:
        summary["wandb_offline"] = run_loggers.wandb_offline  # printed as `wandb sync <dir>` (no key: ran offline)
    if "val/critique_lm" in summary["metrics"]:
        # A writing model's critique LM: its val loss beside a uniform guess over the vocabulary (has it learned?)
        summary["critique_lm_uniform"] = math.log(len(model.tokenizer))
    if liger_report(model):
        summary["liger"] = liger_report(model)  # which of Liger's kernels ran (model.liger=true)
    whole = None
    if cfg.get("export", True):
        try:
            whole = whole_model(trainer, module, cfg)
        except ExportRefused as e:
            log.error("%s", e)
            summary["export_skipped"] = str(e)
    if not trainer.is_global_zero:
        return summary
    if strategies.weight_sharding(trainer) is None:
        # Over the whole val set in this process (rank 0 holds the whole weights); scored only if the model reads it.
        report = model.head_report(score_batches(model, dm.eval_loader()))
        if report:
            summary["head_report"] = report  # judge position bias, attribute correlations
    else:
        log.info("head report skipped: the weights are sharded; run eval.py on the checkpoint for it")
    if whole is not None:
        # The val rewards of the final weights, gathered from every rank by the last validation; else scored here.
        rewards = final_val_rewards(trainer)
        stats = reward_stats(rewards if rewards is not None else val_rewards(whole, dm.eval_loader()))
        summary.update(export_model(whole, out, {**stats, "scoring": dm.scoring_meta()}))
    write_summary(summary, out)
    return summary
