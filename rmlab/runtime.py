"""What every run needs around its work: the run dir, threads, the saved config, loggers and wandb's lifecycle.

``start_run`` is the first thing ``train.py`` and ``eval.py`` do. ``Loggers`` is a context manager: inside it
the loggers exist; leaving it (normally or by an exception) finishes wandb with the right exit code, so a
crash never leaves a wandb run open. The wandb key is only ever checked for presence, never read out loud.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
import transformers
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rmlab.checkpoint import wandb_run_id
from rmlab.rundir import claim_run_dir, run_kind, set_aside_earlier_run

log = logging.getLogger("rmlab")


def quiet_console() -> None:
    """Each console line once, and no warning a user cannot act on.

    ``import lightning`` gives its ``lightning`` logger a console handler of its own and keeps propagation on,
    so under Hydra's job logging every Lightning message printed twice ("INFO: ..." and Hydra's line). Where
    the root logger has handlers (Hydra's: the console and the job's .log file) Lightning's own is dropped.
    Lightning 2.6 on torch >= 2.10 also warns about its own use of ``LeafSpec`` at every run."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if logging.getLogger().handlers:
        lightning = logging.getLogger("lightning")
        for h in list(lightning.handlers):
            if type(h) is logging.StreamHandler:
                lightning.removeHandler(h)


def start_run(cfg: DictConfig, resolve: bool = True, resuming: bool = False) -> tuple[Path, float]:
    """Quiet transformers and duplicate console lines, the run dir (an earlier run's outputs in it set aside
    unless this run resumes it), threads, the config saved in the run dir. Returns (run dir, start time)."""
    transformers.logging.set_verbosity_error()
    quiet_console()
    t0 = time.time()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_run_dir(out)  # one live run per dir: another one's dir stops this run with RunDirBusy
    if not resuming and (moved := set_aside_earlier_run(out, run_kind(cfg))) is not None:
        msg = (f"{out} held an earlier run: its outputs (config, metrics, CSV, checkpoints, export) are kept in "
               f"{moved}. To continue that run instead, move them back and pass ckpt_path=last.")
        print(f"rmlab: {msg}", flush=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=resolve))
    return out, t0


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
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    out = Path(cfg.paths.output_dir)
    try:
        hc = HydraConfig.get()
        name = hc.job.override_dirname or out.name
        group = f"{cfg.task_name}/{Path(hc.sweep.dir).name}" if hc.mode == RunMode.MULTIRUN else cfg.task_name
    except ValueError:  # called outside a Hydra app (tests, notebooks)
        name, group = out.name, cfg.task_name
    return name, group


def is_wandb(logger) -> bool:
    return type(logger).__name__ == "WandbLogger"


def build_loggers(cfg: DictConfig) -> list:
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
    if not any(is_wandb(lg) for lg in loggers):
        return
    try:
        import wandb  # installed whenever a WandbLogger exists

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
    except Exception as e:  # finishing must never mask the run's own error
        log.warning("wandb.finish failed: %s", e)


class Loggers:
    """``with Loggers(cfg) as loggers:`` the run's loggers; wandb is finished on the way out, whatever happened."""

    def __init__(self, cfg: DictConfig):
        self.loggers = build_loggers(cfg)
        self.wandb_offline: str | None = None  # after the block: an offline wandb run's dir, for `wandb sync <dir>`

    def __enter__(self) -> list:
        return self.loggers

    def __exit__(self, exc_type, exc, tb) -> None:
        self.wandb_offline = wandb_offline_dir(self.loggers)
        finish_wandb(self.loggers, failed=exc_type is not None)


def wandb_offline_dir(loggers: list) -> str | None:
    """The dir of this process's offline wandb run (``<run dir>/wandb/offline-run-*``), or None: wandb is silenced
    (WANDB_SILENT), so its own "wandb sync" hint never shows and the run summary prints it instead."""
    for lg in loggers:
        if is_wandb(lg) and getattr(lg, "_offline", False) and getattr(lg, "_experiment", None) is not None:
            files = getattr(lg.experiment, "dir", None)  # <run dir>/wandb/offline-run-<time>-<id>/files
            return str(Path(files).parent) if files else None
    return None
