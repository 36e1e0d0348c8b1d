"""DDP: the grouped sampler shards disjoint groups by rank; under `trainer=ddp_cpu` (2 processes, gloo) val
metrics are synced, there is one run dir and one checkpoint per save; the global batch is in comparisons."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rmlab.data.sampler import GroupBatchSampler
from tests.conftest import ROOT, compose


def _sampler(world: int, rank: int, even: bool, epoch: int = 0, **kw) -> GroupBatchSampler:
    rng = random.Random(0)
    rows = [rng.randint(2, 5) for _ in range(200)]
    s = GroupBatchSampler(
        rows,
        [rng.randint(20, 300) for _ in rows],
        max_tokens=2048,
        max_responses=16,
        num_replicas=world,
        rank=rank,
        even=even,
        **kw,
    )
    s.set_epoch(epoch)
    return s


def test_sampler_gives_each_rank_disjoint_groups():
    for epoch in (0, 1):
        train = [list(_sampler(2, r, even=True, epoch=epoch)) for r in (0, 1)]
        g0, g1 = ({g for b in batches for g in b} for batches in train)
        assert g0 and g1 and not g0 & g1
        assert len(train[0]) == len(train[1])  # same number of steps on each rank: no DDP hang
        # Together the ranks cover the data, each group once: an odd batch count is evened by a split, not a drop.
        assert g0 | g1 == set(range(200)) and sum(len(b) for r in train for b in r) == 200
        assert _sampler(2, 0, even=True, epoch=epoch).coverage()["left_out"] == 0
        evaluation = [list(_sampler(2, r, even=False, epoch=epoch)) for r in (0, 1)]
        e0, e1 = ({g for b in batches for g in b} for batches in evaluation)
        assert not e0 & e1 and e0 | e1 == set(range(200))  # evaluation scores every group exactly once
    assert list(_sampler(2, 0, True, epoch=0)) != list(_sampler(2, 0, True, epoch=1))  # set_epoch reshuffles


def test_global_batch_is_counted_in_comparisons_and_divided_across_ranks():
    from rmlab.data.datamodule import RewardDataModule

    dm = RewardDataModule(global_batch_comparisons=48)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, accumulate_grad_batches=2)
    assert dm.per_rank_comparisons() == 12  # 48 comparisons per optimizer step = 2 ranks x 2 micro-batches x 12
    dm.global_batch_comparisons = 50
    with pytest.raises(ValueError, match="does not divide across 2 ranks x 2 accumulation"):
        dm.per_rank_comparisons()

    k = [random.Random(i).randint(2, 4) for i in range(120)]
    cmp = [n * (n - 1) // 2 for n in k]  # every pair compared: C(K, 2)
    s = GroupBatchSampler(k, [50] * len(k), max_tokens=10**6, max_responses=10**6, comparisons=cmp, max_comparisons=12)
    sizes = [sum(cmp[i] for i in b) for b in s]
    assert max(sizes) <= 12 and sum(sizes) == sum(cmp)  # a cap; groups are never cut
    assert sum(sizes) / len(sizes) > 9  # and batches are filled up to it, not left half-empty
    with pytest.raises(ValueError, match="more than the per-rank batch"):
        GroupBatchSampler(k, [50] * len(k), comparisons=cmp, max_comparisons=4)


@pytest.mark.parametrize("data", sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml")))
def test_global_batch_comparisons_composes_on_every_data_config(data, tmp_path):
    from hydra.utils import instantiate

    cfg = compose([f"data={data}", "data.global_batch_comparisons=64"], tmp_path)
    assert cfg.data.global_batch_comparisons == 64
    if data != "hh_harmless":
        return
    dm = instantiate(cfg.data, tokenizer=None, _convert_="all")  # no data is read before setup()
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, accumulate_grad_batches=1)
    assert dm.global_batch_comparisons == 64 and dm.per_rank_comparisons() == 32
    dm.global_batch_comparisons = 63
    with pytest.raises(
        ValueError, match=r"global_batch_comparisons=63 does not divide across 2 ranks x 1 accumulation"
    ):
        dm.per_rank_comparisons()


@pytest.mark.slow
def test_ddp_cpu_one_run_dir_disjoint_ranks_synced_val(tmp_path):
    import lightning as L
    from hydra.utils import instantiate

    runs = tmp_path / "runs"
    data = ["model=tiny_llama", "data.simulator.num_prompts=300"]
    cmd = [
        sys.executable,
        "train.py",
        *data,
        "trainer=ddp_cpu",
        "threads=1",
        "trainer.max_steps=6",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "~callbacks.progress_bar",
        "export=false",
        "+callbacks.spy._target_=tests.faults.RecordGroups",
        # microseconds in the dir name: a child that re-resolved it would make a second run dir
        f"hydra.run.dir={runs}/" + "${now:%H-%M-%S-%f}",
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]

    dirs = list(runs.iterdir())
    assert len(dirs) == 1, dirs
    run = dirs[0]
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == ["last.ckpt", "step3.ckpt", "step6.ckpt"]

    seen = [[json.loads(line) for line in (run / f"groups_rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6  # 6 steps on each rank
    g0, g1 = ({g for b in batches for g in b} for batches in seen)
    assert g0 and g1 and not g0 & g1

    # A single process scores the same weights on the same val data.
    cfg = compose(data, tmp_path / "single")
    model = instantiate(cfg.model, _convert_="all")
    dm = instantiate(cfg.data, tokenizer=model.tokenizer, _convert_="all")
    module = instantiate(cfg.optim, model=model, loss=instantiate(cfg.loss, _convert_="all"), _convert_="all")
    module.load_state_dict(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    single = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/acc"]
    dm._world = lambda: (2, 0)  # rank 0's half alone: what an unsynced metric would have reported
    half = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/acc"]

    ddp = json.loads((run / "metrics.json").read_text())["val_acc"]
    assert ddp == pytest.approx(single, abs=1e-6)
    assert abs(half - single) > 1e-3  # the check has teeth: rank 0's half alone differs
