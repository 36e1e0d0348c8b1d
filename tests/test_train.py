"""End-to-end training through Hydra: parameters move, accuracy beats chance, configs compose, -m works."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose

GROUPS = ["model", "loss", "data", "optim", "trainer", "logger", "callbacks", "experiment", "hparams_search", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group, tmp_path):
    opts = _options(group)
    if group in ("model", "loss", "data", "trainer", "logger", "callbacks", "optim"):
        assert opts, f"conf/{group} has no options"
    for opt in opts:
        overrides = [f"{group}={opt}"]
        if group == "model" and opt == "hf":
            overrides.append("model.name_or_path=some/model")
        cfg = compose(overrides, tmp_path)
        from omegaconf import OmegaConf

        # Resolving every interpolation catches typos in ${...} before a run does.
        OmegaConf.to_container(cfg, resolve=True)
        assert cfg.trainer.max_epochs >= 1


def test_one_epoch_by_default(tmp_path):
    cfg = compose([], tmp_path)
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.max_steps == -1
    assert cfg.model.name_or_path == "minilm" and cfg.data.source == "simulator"
    assert cfg.model.trust_remote_code is False


@pytest.mark.slow
def test_training_moves_every_parameter_and_beats_chance(tmp_path):
    from rmlab.train import run

    cfg = compose(
        [
            "model=tiny_llama",
            "data.simulator.num_prompts=600",
            "data.simulator.temperature=0.2",
            "optim.lr=3e-3",
            "optim.warmup_ratio=0.0",
            "trainer.max_epochs=2",
            "seed=1",
        ],
        tmp_path,
    )
    from hydra.utils import instantiate

    torch.manual_seed(1)
    before = {k: v.clone() for k, v in instantiate(cfg.model, _convert_="all").state_dict().items()}
    summary = run(cfg)
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = {k.removeprefix("model."): v for k, v in trained.items() if k.startswith("model.")}
    params = {k for k, _ in instantiate(cfg.model, _convert_="all").named_parameters()}
    assert params and params <= set(trained), sorted(params - set(trained))[:5]
    unchanged = [k for k in params if torch.equal(before[k], trained[k])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    assert summary["val_acc"] > 0.6, summary
    assert summary["val_acc"] > summary["length_acc"] + 0.05
    # Run dir contents promised by the README.
    for rel in ["config.yaml", "data_report.json", "metrics.json", "csv/metrics.csv", "checkpoints/last.ckpt", "export/model.safetensors"]:
        assert (tmp_path / rel).exists(), rel
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"]["balanced"] and report["val"]["balanced"]


@pytest.mark.slow
def test_multirun_subprocess(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "train.py", "-m", "loss=bt,logexp,margin", "model=tiny_llama", "trainer.max_steps=3",
        "data.simulator.num_prompts=60", "export=false", f"hydra.sweep.dir={sweep}",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert len(runs) == 3, [p.name for p in sweep.iterdir()]
    losses = [json.loads((r / "metrics.json").read_text())["metrics"]["val/loss"] for r in runs]
    assert all(math.isfinite(v) for v in losses)  # three real runs, each with a finite val loss
    names = [Path(r).name for r in runs]  # <job num>_<overrides>: one dir per job, named by its overrides
    assert sorted(n.split("_", 1)[0] for n in names) == ["0", "1", "2"]
    assert {next(p for p in n.split(",") if p.startswith("loss=")) for n in names} == {"loss=bt", "loss=logexp", "loss=margin"}
