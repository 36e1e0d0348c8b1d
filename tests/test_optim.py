"""AdamW with no decay on biases and norms; warm-up then cosine, stepped per optimizer step (a real run's
logged learning rates against the formula)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def test_param_groups_and_the_logged_schedule(tmp_path):
    from rmlab.train import run

    lr, steps, warm_ratio, floor = 1e-3, 12, 0.25, 0.1
    cfg = compose(
        [
            "model=tiny_llama",
            "threads=1",
            "export=false",
            "data.cache=false",
            "data.simulator.num_prompts=200",
            "data.max_groups=4",
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=-1",
            "trainer.log_every_n_steps=1",
            "trainer.check_val_every_n_epoch=1000",
            f"module.lr={lr}",
            f"module.warmup_ratio={warm_ratio}",
            f"module.min_lr_ratio={floor}",
            "module.scheduler=cosine",
            "module.weight_decay=0.05",
        ],
        tmp_path,
    )
    run(cfg)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    got = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    assert got == [float(r["lr-AdamW/pg2"]) for r in rows if r.get("lr-AdamW/pg2")]  # both groups, one schedule
    warm = int(warm_ratio * steps)  # 3 warm-up steps, then cosine from lr down to floor * lr

    def want(step):
        if step < warm:
            return lr * (step + 1) / (warm + 1)
        t = (step - warm) / (steps - warm)
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))

    assert len(got) == steps  # one value per optimizer step: the scheduler steps per step, not per epoch
    assert got == pytest.approx([want(s) for s in range(steps)], rel=1e-6)
    assert got[0] < got[warm] and got[-1] < got[warm]


def test_no_weight_decay_on_biases_and_norms(tmp_path):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    cfg = compose(["model=tiny_llama", "module.weight_decay=0.05"], tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    module = instantiate(cfg.module, model=model, loss=instantiate(cfg.loss, _convert_="all"), _convert_="all")
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers reads from it
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    nd = [names[id(p)] for p in no_decay["params"]]
    d = [names[id(p)] for p in decay["params"]]
    assert nd and all(("norm" in n.lower() or n.endswith("bias")) for n in nd), nd
    assert any("norm" in n for n in nd)
    assert d and all(p.ndim >= 2 and "norm" not in names[id(p)].lower() for p in decay["params"])
    assert len(nd) + len(d) == sum(1 for p in module.parameters() if p.requires_grad)


def test_fused_adamw_only_on_cuda():
    """Fused AdamW where every parameter is on a GPU; on CPU PyTorch's default (the CPU figures are unchanged)."""
    from rmlab.module import fused_adamw

    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert fused_adamw(cpu) == {"foreach": True}
    meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert fused_adamw(meta) == {}
    if torch.cuda.is_available():
        assert fused_adamw([torch.nn.Parameter(torch.zeros(2, device="cuda"))]) == {"fused": True}
        assert fused_adamw(cpu + [torch.nn.Parameter(torch.zeros(2, device="cuda"))]) == {}


def test_cpu_adamw_is_bitwise_the_default():
    """The CPU choice (foreach) gives exactly the parameters PyTorch's default per-tensor loop gives: the
    default run's figures do not move."""
    from rmlab.module import fused_adamw

    def train(kind: dict) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(300, 16), (16, 16), (16,), (1, 16)]]
        opt = torch.optim.AdamW([{"params": ps[:2], "weight_decay": 0.01}, {"params": ps[2:], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.999), eps=1e-8, **kind)
        for _ in range(20):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach() for p in ps]

    kind = fused_adamw([torch.nn.Parameter(torch.zeros(1))])
    assert kind == {"foreach": True}
    for a, b in zip(train({}), train(kind)):
        assert torch.equal(a, b)


def _tiny_fit(module_cls, accumulate: int, batches: int):
    """``batches`` training batches of a tiny llama (byt5 tokens, simulator groups) under ``module_cls``; returns
    the module and, for each batch, how many parameters held a gradient when the batch started (before its
    forward: the activation peak)."""
    import lightning as L

    from rmlab.data.datamodule import build_datamodule
    from rmlab.data.simulator import SimulatorConfig, generate
    from rmlab.data.tokenize import tokenize_groups
    from rmlab.data.types import DataReport
    from rmlab.losses import BTLoss
    from rmlab.models import build_model
    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5")
    groups = tokenize_groups(generate(SimulatorConfig(num_prompts=24, k=2, seed=3)), model.tokenizer, DataReport(),
                             max_length=256, min_prompt_tokens=8)
    dm = build_datamodule(tokenizer=model.tokenizer, max_tokens=600, max_groups=None, seed=0, cache=False)
    dm.train_groups, dm.val_groups = groups, []
    module = module_cls(model, BTLoss(), lr=1e-2, weight_decay=0.0, warmup_ratio=0.0, scheduler="constant")
    held: list[int] = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            held.append(sum(p.grad is not None for p in pl_module.parameters()))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=batches // accumulate, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[Probe()])
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return module, held


def test_gradients_are_freed_after_each_optimizer_step():
    """Lightning zeroes gradients inside the next step's closure, after its forward, so the forward would hold
    the last step's gradients as well (one more parameter-sized set at the activation peak; on CPU, host memory:
    11.7 -> 11.0 GB peak on Qwen2-0.5B's shape, docs/bench.md). RewardModule frees them right after the step:
    nothing is held when a batch starts, except inside a gradient-accumulation window; the weights come out
    bitwise the same as with Lightning's own timing."""
    import lightning as L

    from rmlab.module import RewardModule

    class LightningTiming(RewardModule):
        optimizer_step = L.LightningModule.optimizer_step  # Lightning's: gradients freed by the next closure

    ours, held = _tiny_fit(RewardModule, accumulate=1, batches=3)
    theirs, held_lightning = _tiny_fit(LightningTiming, accumulate=1, batches=3)
    n_params = sum(1 for p in ours.parameters() if p.requires_grad)
    assert held == [0, 0, 0]
    assert held_lightning == [0, n_params, n_params]  # what the probe sees without the fix
    init = _tiny_fit(RewardModule, accumulate=1, batches=0)[0].state_dict()
    a, b = ours.state_dict(), theirs.state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)  # and to the same weights
    # Accumulation: the gradients of the window's first micro-batch stay until its optimizer step.
    _, held_acc = _tiny_fit(RewardModule, accumulate=2, batches=4)
    assert held_acc == [0, n_params, 0, n_params]
