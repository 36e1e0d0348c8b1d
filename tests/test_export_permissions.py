"""The export is read by other people and tools (a shared cluster's RL job, a colleague): its files get the
permissions of the user's umask like every other file of the run. safetensors 0.8 writes model.safetensors
as 0600 (owner only) whatever the umask, so a group that could read config.json could not read the weights."""

from __future__ import annotations

import os
import stat


def test_every_export_file_follows_the_umask(tiny_llama, tmp_path):
    from rmlab.export import export_model

    old = os.umask(0o022)
    try:
        paths = export_model(tiny_llama, tmp_path, {"reward_mean": 0.0, "reward_std": 1.0})
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json"}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert all(m == 0o644 for m in modes.values()), modes
    assert paths["export_dir"] == str(tmp_path / "export")


def test_a_private_umask_stays_private(tiny_llama, tmp_path):
    from rmlab.export import export_model

    old = os.umask(0o077)
    try:
        export_model(tiny_llama, tmp_path, {"reward_mean": 0.0, "reward_std": 1.0})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "export").rglob("*") if p.is_file()}
    assert all(m == 0o600 for m in modes.values()), modes  # never wider than the user asked for
