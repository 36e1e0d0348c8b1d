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
