"""DDP: the grouped sampler shards disjoint groups by rank; under `trainer=ddp_cpu` (2 processes, gloo) val
metrics are synced, there is one run dir and one checkpoint per save; the global batch is in comparisons."""

from __future__ import annotations

import json
import random
import re
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
    from rmlab.data.datamodule import build_datamodule

    dm = build_datamodule(global_batch_comparisons=48)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, accumulate_grad_batches=2)
    assert dm.per_rank_comparisons() == 12  # 48 comparisons per optimizer step = 2 ranks x 2 micro-batches x 12
    dm.batches.global_batch_comparisons = 50
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


def _val_batches(n_groups: int = 24, per_batch: int = 3, seed: int = 0):
    """Toy val batches (K = 3, all pairs, strengths, true rewards, ranks) and a reward per response."""
    from rmlab.data.collate import collate
    from rmlab.data.tokenize import TokenizedGroup

    rng = random.Random(seed)
    groups = []
    for i in range(n_groups):
        true = [rng.gauss(0, 1) for _ in range(3)]
        order = sorted(range(3), key=lambda j: -true[j])
        pairs = [(order[a], order[b]) for a in range(3) for b in range(a + 1, 3)]
        groups.append(
            TokenizedGroup(
                prompt_ids=[5, 6, 7][: 1 + i % 3],
                response_ids=[[8 + j] * rng.randint(1, 9) + [1] for j in range(3)],
                winner=[w for w, _ in pairs],
                loser=[lo for _, lo in pairs],
                margin=[float("nan")] * 3,
                strength=[rng.randint(0, 3) for _ in pairs],
                weight=[1.0] * 3,
                tie=[rng.random() < 0.1 for _ in pairs],
                group_weight=[1 / 3] * 3,
                group_id=f"g{i}",
                ranks=[float(order.index(j)) for j in range(3)],
                true_rewards=true,
            )
        )
    out = []
    for b in range(0, n_groups, per_batch):
        batch = collate(groups[b : b + per_batch], 0)
        out.append((torch.tensor([rng.gauss(0, 2) for _ in range(batch.input_ids.shape[0])]), batch))
    return out


def test_concatenated_rank_shares_give_the_single_process_metrics():
    from rmlab.metrics import PredictionCollector, compute_all, concat_predictions

    batches = _val_batches()
    whole, shares = PredictionCollector(keep_tokens=True), [PredictionCollector(keep_tokens=True) for _ in range(2)]
    for i, (rewards, batch) in enumerate(batches):
        whole.add(rewards, batch)
        shares[i % 2].add(rewards, batch)  # batch b on rank b mod 2, as the sampler shards them
    one = whole.result()
    joined = concat_predictions([shares[0].result(), shares[1].result(), PredictionCollector().result()])
    assert sorted(joined.group_ids) == sorted(one.group_ids) and len(joined.tokens) == len(one.tokens)
    expected, got = compute_all(one).scalars, compute_all(joined).scalars
    assert got.keys() == expected.keys() and {"ece", "length/pearson", "rank/kendall_tau", "truth/acc"} <= got.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-12, nan_ok=True), k
    half = compute_all(shares[0].result()).scalars
    assert abs(half["ece"] - expected["ece"]) > 1e-3  # one share alone differs


def _gather_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from rmlab.callbacks import EvalMetricsCallback
    from rmlab.module import StepOutput

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cb = EvalMetricsCallback(wandb_media=False)
        trainer = SimpleNamespace(
            world_size=2, sanity_checking=False, global_step=7, is_global_zero=rank == 0, loggers=[]
        )
        logged: dict[str, float] = {}
        module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, value))
        results = []
        # Epoch 1: batch b on rank b mod 2. Epoch 2: rank 1 scored no batch (an uneven val split), and must still
        # join the gather rather than leave rank 0 waiting.
        for mine in (lambda b: b % 2 == rank, lambda b: rank == 0):
            logged.clear()
            cb.on_validation_epoch_start(trainer, module)
            for b, (rewards, batch) in enumerate(_val_batches()):
                if mine(b):
                    module.last_step = StepOutput(torch.tensor(0.0), rewards, batch, "val")
                    cb.on_validation_batch_end(trainer, module, None, batch, b)
            cb.on_validation_epoch_end(trainer, module)
            results.append({"logged": dict(logged), "n": int(cb.last_pred.reward.size), "step": cb.last_step})
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_val_callback_gathers_every_rank_even_an_empty_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from rmlab.metrics import PredictionCollector, compute_all

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gather_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    col = PredictionCollector()
    for rewards, batch in _val_batches():
        col.add(rewards, batch)
    expected = compute_all(col.result()).scalars
    assert r0 == r1  # the same values on every rank
    for epoch in r0:
        assert epoch["n"] == col.result().reward.size and epoch["step"] == 7
        for key in ("ece", "brier", "length/pearson", "rank/kendall_tau", "truth/acc", "bucket_strength/2"):
            assert epoch["logged"][f"val/{key}"] == pytest.approx(expected[key], abs=1e-12), key


@pytest.mark.parametrize("data", sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml")))
def test_global_batch_comparisons_composes_on_every_data_config(data, tmp_path):
    from hydra.utils import instantiate

    cfg = compose([f"data={data}", "data.global_batch_comparisons=64"], tmp_path)
    assert cfg.data.global_batch_comparisons == 64
    if data != "hh_harmless":
        return
    dm = instantiate(cfg.data, tokenizer=None, _convert_="all")  # no data is read before setup()
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, accumulate_grad_batches=1)
    assert dm.batches.global_batch_comparisons == 64 and dm.per_rank_comparisons() == 32
    dm.batches.global_batch_comparisons = 63
    with pytest.raises(
        ValueError, match=r"global_batch_comparisons=63 does not divide across 2 ranks x 1 accumulation"
    ):
        dm.per_rank_comparisons()


@pytest.mark.slow
def test_ddp_cpu_one_run_dir_disjoint_ranks_synced_val(tmp_path):
    import lightning as L
    from hydra.utils import instantiate

    from rmlab.callbacks import EvalMetricsCallback
    from rmlab.evaluate import score_loader

    def reward_stats(model, dm) -> dict:  # what a single process computes over the val loader it is given
        r = torch.from_numpy(score_loader(model.eval(), dm.val_dataloader()).reward)
        return {"reward_n": r.numel(), "reward_mean": float(r.mean()), "reward_std": float(r.std())}

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

    # A single process scores the same weights on the same val data, with the same val/* callback.
    cfg = compose(data, tmp_path / "single")
    model = instantiate(cfg.model, _convert_="all")
    dm = instantiate(cfg.data, tokenizer=model.tokenizer, _convert_="all")
    module = instantiate(cfg.module, model=model, loss=instantiate(cfg.loss, _convert_="all"), _convert_="all")
    module.load_state_dict(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EvalMetricsCallback(wandb_media=False)],
    )
    single = trainer.validate(module, datamodule=dm, verbose=False)[0]
    single_stats = reward_stats(model, dm)  # the whole val set, scored here
    dm._world = lambda: (2, 0)  # rank 0's half alone: what an unsynced metric would have reported
    half = trainer.validate(module, datamodule=dm, verbose=False)[0]
    half_stats = reward_stats(model, dm)

    summary = json.loads((run / "metrics.json").read_text())
    ddp = {"val/acc": summary["val_acc"], **summary["metrics"]}
    # val/acc is a synced torchmetric; the callback's metrics come from all ranks' gathered predictions.
    for key in ("val/acc", "val/ece", "val/brier", "val/length/pearson", "val/bucket_strength/3"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
    # The checks have teeth: rank 0's half alone differs.
    assert abs(half["val/acc"] - single["val/acc"]) > 1e-3
    assert abs(half["val/ece"] - single["val/ece"]) > 1e-3
    assert abs(half["val/length/pearson"] - single["val/length/pearson"]) > 1e-3

    # The export's normalization statistics are over the whole val set, as a single process computes them.
    meta = json.loads((run / "export" / "config.json").read_text())["rmlab"]
    assert meta["reward_n"] == single_stats["reward_n"] > half_stats["reward_n"]
    for key in ("reward_mean", "reward_std"):
        assert meta[key] == pytest.approx(single_stats[key], abs=1e-5), key
        assert abs(half_stats[key] - single_stats[key]) > 1e-4, key


def _fake_trainer(strategy, world_size: int = 2, rank: int = 0):
    return SimpleNamespace(strategy=strategy, world_size=world_size, is_global_zero=rank == 0)


def test_weight_sharding_names_the_strategies_that_split_weights():
    from torch.distributed.fsdp import ShardingStrategy

    from rmlab.strategies import weight_sharding

    FSDPStrategy = type("FSDPStrategy", (), {})
    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})
    DDPStrategy = type("DDPStrategy", (), {})

    def fsdp(sharding):
        s = FSDPStrategy()
        s.sharding_strategy = sharding
        return s

    def deepspeed(stage):
        s = DeepSpeedStrategy()
        s.config = {"zero_optimization": {"stage": stage}}
        return s

    assert weight_sharding(_fake_trainer(fsdp(ShardingStrategy.FULL_SHARD))) == "fsdp"
    assert weight_sharding(_fake_trainer(fsdp(ShardingStrategy.SHARD_GRAD_OP))) == "fsdp"  # resharded after backward
    assert weight_sharding(_fake_trainer(fsdp(ShardingStrategy.NO_SHARD))) is None
    assert weight_sharding(_fake_trainer(fsdp(ShardingStrategy.FULL_SHARD), world_size=1)) is None  # one GPU: NO_SHARD
    assert weight_sharding(_fake_trainer(deepspeed(3))) == "deepspeed_zero3"
    assert weight_sharding(_fake_trainer(deepspeed(2))) is None  # ZeRO-2 shards gradients and optimizer state only
    assert weight_sharding(_fake_trainer(DDPStrategy())) is None


def test_export_under_fsdp_sharding_gathers_on_every_rank_and_rank0_rebuilds(tmp_path, monkeypatch):
    """The branch multi-GPU FSDP takes (not runnable here: FSDP needs GPUs). Every rank joins the full-state-dict
    gather; rank 0 loads it into a fresh model, so the export never runs a forward on sharded weights."""
    from hydra.utils import instantiate

    import rmlab.export as export
    import rmlab.strategies as strategies

    cfg = compose(["model=tiny_llama"], tmp_path)
    torch.manual_seed(1)
    model = instantiate(cfg.model, _convert_="all")
    module = instantiate(cfg.module, model=model, loss=instantiate(cfg.loss, _convert_="all"), _convert_="all")
    gathered = []
    monkeypatch.setattr(strategies, "weight_sharding", lambda trainer: "fsdp")
    monkeypatch.setattr(
        export, "gather_full_state_dict", lambda trainer: gathered.append(trainer) or module.state_dict()
    )

    assert export.whole_model(_fake_trainer(None, rank=1), module, cfg) is None and len(gathered) == 1
    whole = export.whole_model(_fake_trainer(None, rank=0), module, cfg)
    assert len(gathered) == 2 and whole is not model
    for (k, a), (k2, b) in zip(model.state_dict().items(), whole.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k

    monkeypatch.setattr(strategies, "weight_sharding", lambda trainer: "deepspeed_zero3")
    with pytest.raises(export.ExportRefused, match="not supported under DeepSpeed ZeRO-3"):
        export.whole_model(_fake_trainer(None), module, cfg)


def test_a_refused_export_is_skipped_with_the_reason_and_the_run_still_reports(tmp_path, monkeypatch):
    import rmlab.strategies as strategies
    import rmlab.train as train

    monkeypatch.setattr(strategies, "weight_sharding", lambda trainer: "deepspeed_zero3")
    cfg = compose(
        [
            "model=tiny_llama",
            "data.simulator.num_prompts=60",
            "trainer.max_steps=2",
            "threads=1",
            "~callbacks.progress_bar",
        ],
        tmp_path,
    )
    summary = train.run(cfg)
    assert "DeepSpeed ZeRO-3" in summary["export_skipped"] and "export_dir" not in summary
    assert not (tmp_path / "export").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["export_skipped"] == summary["export_skipped"]


@pytest.mark.slow
def test_ddp_nonfinite_val_on_one_rank_stops_every_rank_without_a_hang(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "model=tiny_llama",
        "data.simulator.num_prompts=200",
        "data.max_groups=4",  # 20 val prompts in 5 batches: rank 0 gets 3, rank 1 gets 2
        "trainer=ddp_cpu",
        "threads=1",
        "trainer.max_steps=2",
        "export=false",
        "~callbacks.progress_bar",
        "+callbacks.poison._target_=tests.faults.PoisonValOnRank",
        "+callbacks.poison.rank=0",
        "+callbacks.poison.batch=2",  # rank 0's extra batch: rank 1 has no batch to meet a per-step collective
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)  # a hang would time out
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "non-finite val loss" in out and "prompt ids in the batch" in out, out[-3000:]
    # Only the poisoned batch is reported: a per-step collective met by another collective on the rank that
    # ran out of batches would make the healthy rank report finite rewards as non-finite.
    counts = [int(n) for n in re.findall(r"rewards \((\d+) of \d+ non-finite\)", out)]
    assert counts and all(n > 0 for n in counts), out[-3000:]
