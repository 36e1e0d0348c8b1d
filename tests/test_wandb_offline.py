"""logger=wandb with no key runs offline and silenced (WANDB_SILENT), so wandb's own "wandb sync" hint never shows:
the run summary must say where the offline run is and how to upload it."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from tests.conftest import compose


def test_an_offline_wandb_run_is_named_in_the_summary_with_its_sync_command(tmp_path, monkeypatch):
    import wandb

    from rmlab.runtime import Loggers
    from rmlab.summary import format_summary

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no key anywhere: offline, as a new user's first run
    monkeypatch.setenv("WANDB_SILENT", os.environ.get("WANDB_SILENT", "true"))
    cfg = compose(["logger=wandb"], tmp_path)
    run_loggers = Loggers(cfg)
    with run_loggers as loggers:
        lg = [x for x in loggers if type(x).__name__ == "WandbLogger"][0]
        lg.log_metrics({"train/loss": 0.5}, step=1)
    assert wandb.run is None  # finished on the way out
    run = Path(run_loggers.wandb_offline)
    assert run.parent == tmp_path / "wandb" and run.name.startswith("offline-run-")
    assert list(run.glob("run-*.wandb"))  # what `wandb sync` uploads
    summary = {"run_dir": str(tmp_path), "val_acc": 0.5, "oracle_acc": None, "length_acc": None, "train_steps": 1,
               "minutes": 0.1, "wandb_offline": str(run)}
    line = next(x for x in format_summary(summary).splitlines() if "wandb sync" in x)
    assert shlex.split(line.split("wandb sync", 1)[1]) == [str(run)]


def test_a_csv_only_run_prints_no_wandb_line(tmp_path):
    from rmlab.runtime import Loggers
    from rmlab.summary import format_summary

    run_loggers = Loggers(compose([], tmp_path))
    with run_loggers:
        pass
    assert run_loggers.wandb_offline is None
    summary = {"run_dir": str(tmp_path), "val_acc": 0.5, "oracle_acc": None, "length_acc": None, "train_steps": 1,
               "minutes": 0.1}
    assert "wandb" not in format_summary(summary)
