"""Broken checkpoints and exports get a clear message (the file, what is wrong, what to do) and, for
``ckpt_path=last``, a fallback to the newest intact checkpoint; a checkpoint of another architecture is
refused before any model is built."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SHARED_DATA, TINY_LLAMA, compose, needs_shared_data

RUN = [
    "model=tiny_llama",
    "data.simulator.num_prompts=40",
    "trainer.max_steps=4",
    "trainer.max_epochs=-1",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.eval_metrics=null",
    "export=false",
    "threads=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run: checkpoints/step2.ckpt, step4.ckpt, last.ckpt (step 4)."""
    from rmlab.train import run

    out = tmp_path_factory.mktemp("trained")
    run(compose(RUN, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "step2.ckpt", "step4.ckpt"]
    return out


def _copy(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained / "checkpoints", dest / "checkpoints")
    return dest


def test_checkpoints_record_the_model_config(trained):
    saved = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["rmlab_model"]
    assert saved["config"]["hidden_size"] == 64 and saved["tokenizer"] == "byt5"


def test_empty_last_ckpt_alone_is_a_clear_error_not_eoferror(tmp_path):
    from rmlab.checkpoint import CheckpointError, check_checkpoint, resolve_ckpt_path

    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        resolve_ckpt_path("last", tmp_path)
    msg = str(err.value)
    assert str(last) in msg and "empty" in msg and "start this run fresh" in msg, msg
    with pytest.raises(CheckpointError, match="empty") as err:  # given explicitly
        check_checkpoint(last, None)
    assert str(last) in str(err.value) and "no intact checkpoint" in str(err.value)


def test_empty_explicit_ckpt_names_the_intact_one_beside_it(trained, tmp_path):
    from rmlab.checkpoint import CheckpointError, check_checkpoint

    run_dir = _copy(trained, tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(last, compose(RUN, tmp_path).model)
    msg = str(err.value)
    assert f"checkpoint {last} is empty" in msg and f"ckpt_path={run_dir / 'checkpoints' / 'step4.ckpt'}" in msg, msg


def test_lightning_load_of_a_torn_file_is_a_checkpoint_error(trained, tmp_path):
    from rmlab.checkpoint import AtomicCheckpointIO, CheckpointError

    torn = _copy(trained, tmp_path) / "checkpoints" / "last.ckpt"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        AtomicCheckpointIO().load_checkpoint(torn)


@pytest.mark.slow
def test_truncated_last_ckpt_falls_back_to_the_intact_step_checkpoint_and_says_so(tmp_path, capsys):
    from rmlab.train import run

    run_dir = tmp_path
    run(compose(RUN, run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy or disk that stopped midway
    summary = run(compose([*RUN, "trainer.max_steps=6", "ckpt_path=last"], run_dir))
    out = capsys.readouterr().out
    assert f"{last} is truncated" in out and f"resuming from the newest intact checkpoint, {run_dir / 'checkpoints' / 'step4.ckpt'}" in out, out
    assert summary["train_steps"] == 6
    assert torch.load(last, weights_only=True)["global_step"] == 6  # and last.ckpt is whole again


@pytest.mark.slow
def test_a_run_dir_moved_or_copied_then_resumed_keeps_last_ckpt_current(trained, tmp_path):
    """A run dir copied elsewhere (scratch to home, another node) and resumed there: the checkpoint callback's
    saved dirpath is the old dir, so Lightning's version counter wrote the new last checkpoint as last-v1.ckpt
    and left last.ckpt at the old step, where the summary's eval.py line and the next ckpt_path=last pointed."""
    from rmlab.train import run

    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    summary = run(compose([*RUN, "trainer.max_steps=6", "ckpt_path=last"], moved))
    assert summary["train_steps"] == 6
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step2.ckpt", "step4.ckpt", "step6.ckpt"], names
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    # A fresh run (no ckpt_path) in a dir that holds checkpoints keeps them: set aside under previous/, byte for
    # byte, and the new run writes its own under their plain names (no -v1).
    old = {p.name: p.read_bytes() for p in (moved / "checkpoints").iterdir()}
    run(compose([*RUN, "trainer.max_steps=2"], moved))
    (kept,) = (moved / "previous").iterdir()
    assert {p.name: p.read_bytes() for p in (kept / "checkpoints").iterdir()} == old
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["last.ckpt", "step2.ckpt"]


def test_another_architecture_is_refused_before_the_model_is_built(trained, tmp_path, monkeypatch):
    import rmlab.models
    from rmlab.checkpoint import CheckpointError
    from rmlab.train import run

    built = []

    def no_build(*a, **kw):  # a model build that would take long (or fail) must never start
        built.append(kw)
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(rmlab.models, "build_model", no_build)  # what conf/model/*.yaml _target_ locates
    run_dir = _copy(trained, tmp_path)
    cfg = compose([*RUN, "model.config.hidden_size=32", "model.config.num_hidden_layers=3", "ckpt_path=last"], run_dir)
    with pytest.raises(CheckpointError) as err:
        run(cfg)
    msg = str(err.value)
    assert "model.config.hidden_size: checkpoint 64, this config 32" in msg, msg
    assert "model.config.num_hidden_layers: checkpoint 2, this config 3" in msg and str(run_dir) in msg, msg
    assert built == []
    # Knobs that do not decide the weights may differ.
    from rmlab.checkpoint import check_checkpoint

    same = compose([*RUN, "model.dropout=0.1", "model.forward_mode=padded"], run_dir).model
    assert check_checkpoint(run_dir / "checkpoints" / "last.ckpt", same)["config"]["hidden_size"] == 64


def _export(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "rmlab": {"pooling": "last"}}))
    save_file({"a": torch.randn(64, 8), "b": torch.randn(3)}, str(d / "model.safetensors"))
    return d


def test_export_dir_checks(tmp_path):
    from rmlab.checkpoint import CheckpointError, check_export_dir

    d = _export(tmp_path)
    check_export_dir(d)  # whole

    weights = d / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 100])  # half-written
    with pytest.raises(CheckpointError) as err:
        check_export_dir(d)
    assert f"{weights} is incomplete" in str(err.value), err.value
    weights.write_bytes(whole[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        check_export_dir(d)
    weights.write_bytes(whole)

    cfg = d / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])  # truncated config.json
    with pytest.raises(CheckpointError) as err:
        check_export_dir(d)
    assert f"{cfg} is not valid JSON" in str(err.value), err.value
    cfg.unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        check_export_dir(d)


def test_a_real_export_passes_and_a_half_written_one_is_named(tmp_path, tiny_llama):
    from rmlab.checkpoint import CheckpointError, check_export_dir

    out = tiny_llama.save_pretrained(tmp_path / "export")
    check_export_dir(out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is incomplete"):
        check_export_dir(out)


def test_an_export_naming_an_unknown_head_is_refused_by_name_through_rmlab_score(tmp_path, tiny_llama):
    """An export whose config.json names a head this rmlab lacks (another version, a plugin) stopped rmlab.score
    with a ValueError traceback; it is a message naming the file and what to do."""
    out = tiny_llama.save_pretrained(tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    cfg.setdefault("rmlab", {})["head"] = "sclar"
    (out / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "x.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    p = subprocess.run([sys.executable, "-m", "rmlab.score", str(data), "--model", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{out / 'config.json'}: its rmlab record names a head" in p.stderr and "'sclar'" in p.stderr, p.stderr


@pytest.mark.slow
def test_train_py_with_a_broken_checkpoint_exits_with_the_message(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    bad = tmp_path / "checkpoints" / "x.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    cmd = [sys.executable, "train.py", *RUN, f"hydra.run.dir={tmp_path}", f"ckpt_path={bad}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"rmlab: checkpoint {bad} is" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


@needs_shared_data
def test_a_real_vocabulary_export_is_checked_without_decoding_its_tokenizer_json(tmp_path):
    """check_export_dir runs at every eval / rmlab.score / bon load of an export (once per ensemble member). A real
    vocabulary's tokenizer.json (Llama 3.1: 17 MB as transformers saves it) took 0.2 to 0.4 s to json-decode there,
    on top of the tokenizer's own load: the check now reads such a file's two ends, and load_member decodes it only
    when loading fails, so a cut or damaged one is still a CheckpointError naming it."""
    import time

    from rmlab.checkpoint import CheckpointError, check_export_dir
    from rmlab.evaluate import load_member
    from rmlab.models import build_model

    torch.manual_seed(0)
    tok = SHARED_DATA / "tokenizers" / "llama3_1_instruct"
    out = build_model(config=TINY_LLAMA, tokenizer=str(tok)).eval().save_pretrained(tmp_path / "export")
    tj = out / "tokenizer.json"
    whole = tj.read_bytes()
    assert len(whole) > 1 << 20  # the real size this is about

    def best(f) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    decode = best(lambda: json.loads(tj.read_text(encoding="utf-8")))
    check = best(lambda: check_export_dir(out))
    assert check < 0.2 * decode, f"check_export_dir {check:.3f}s, one json decode of tokenizer.json {decode:.3f}s"
    load_member(str(out))  # whole: loads

    inner = whole.index(b"}", len(whole) // 2) + 1  # ends with a } that closes an inner object, not the file's
    for case, data in [("cut at 1/2", whole[: len(whole) // 2]), ("cut after an inner }", whole[:inner]),
                       ("damaged inside", whole[:1000] + b"\x00garbage" + whole[1000:])]:  # fmt: skip
        tj.write_bytes(data)
        with pytest.raises(CheckpointError, match="tokenizer.json") as err:
            load_member(str(out))
        assert "export again" in str(err.value), (case, err.value)
    tj.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"tokenizer.json is not valid JSON \(cut off"):
        check_export_dir(out)  # a cut copy is named before anything loads
