"""A training step reads nothing back from the device: forward, loss and backward make no ``.cpu()``,
``.tolist()``, ``.item()`` (nor ``bool()``/``int()`` of a tensor, nor an op whose output size depends on
the data), in every forward mode. The packed layout is built when the batch is collated.

On CPU every tensor is a host tensor, so a read-back costs nothing here; the test makes each one raise
instead, inside the Lightning step (from ``on_train_batch_start``, after the batch transfer, to
``on_before_optimizer_step``, after the backward), so a GPU step would never wait for its kernels."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from rmlab.data.datamodule import build_datamodule
from rmlab.losses import BTLoss
from rmlab.models import build_model
from rmlab.module import RewardModule
from tests.conftest import TINY_LLAMA


class HostSync(RuntimeError):
    pass


_T = torch.Tensor
BANNED_METHODS = {
    _T.cpu: "Tensor.cpu",
    _T.tolist: "Tensor.tolist",
    _T.item: "Tensor.item",
    _T.numpy: "Tensor.numpy",
    _T.__bool__: "bool(tensor)",
    _T.__int__: "int(tensor)",
    _T.__float__: "float(tensor)",
    _T.__index__: "tensor as a Python index",
}
# Ops whose result is a host scalar or whose output size depends on the data (a sync on CUDA).
BANNED_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::is_nonzero",
    "aten::equal",
    "aten::_unique2",
    "aten::unique_consecutive",
}


class NoHostSyncFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in BANNED_METHODS:
            raise HostSync(f"{BANNED_METHODS[func]} inside the training step")
        return func(*args, **(kwargs or {}))


class NoHostSyncOps(TorchDispatchMode):
    supports_higher_order_operators = True  # flex_attention passes through; its inner ops are seen as usual

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not hasattr(func, "_schema"):
            return func(*args, **kwargs)
        name = func._schema.name
        if name in BANNED_OPS:
            raise HostSync(f"{name} inside the training step")
        if name == "aten::index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
            raise HostSync("boolean-mask indexing inside the training step")
        if name == "aten::repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
            raise HostSync("repeat_interleave without output_size inside the training step")
        return func(*args, **(kwargs or {}))


class Strict(L.Callback):
    """Both modes on from after the batch transfer until the backward is done."""

    def __init__(self):
        self.modes, self.steps = [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes = [NoHostSyncFunctions(), NoHostSyncOps()]
        for m in self.modes:
            m.__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.close()
        self.steps += 1

    def close(self):
        for m in reversed(self.modes):
            m.__exit__(None, None, None)
        self.modes = []


def _train_strictly(model, steps: int = 2) -> tuple[int, dict, dict]:
    dm = build_datamodule(
        tokenizer=model.tokenizer,
        layout=model.batch_layout,
        cache=False,
        simulator={"num_prompts": 24, "k": 3, "seed": 3},
        max_tokens=2048,
        max_length=128,
        min_prompt_tokens=8,
    )
    dm.setup("fit")
    module = RewardModule(model, BTLoss(), lr=1e-2, warmup_ratio=0.0, scheduler="constant")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strict = Strict()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=[strict],
    )
    try:
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
    finally:
        strict.close()
    after = dict(model.named_parameters())
    return strict.steps, before, after


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards (tests/conftest.py)


def test_the_modes_catch_a_read_back():
    """The test's own instruments: each banned read raises inside the modes and works outside."""
    x = torch.arange(4.0)
    with NoHostSyncFunctions(), NoHostSyncOps():
        for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.sum() > 0), lambda: int(x[0]),
                     lambda: x.cpu(), lambda: x[x > 1], lambda: torch.nonzero(x)):
            with pytest.raises(HostSync):
                read()
        y = (x * 2).sum()  # device work is fine
    assert y.item() == 12.0


@pytest.mark.parametrize(
    "mode,attention",
    [
        ("padded", "auto"),
        ("packed", "sdpa"),
        ("prefix_shared", "sdpa"),
        ("auto", "sdpa"),
        ("prefix_shared", "varlen"),  # the reference varlen kernel on CPU: same indices as flash-attn's
    ],
)
def test_training_step_reads_nothing_back(mode, attention):
    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode=mode, attention=attention)
    assert model.forward_mode == mode
    if mode != "padded":
        assert model.batch_layout is not None and model.batch_layout.kernel == attention
    steps, before, after = _train_strictly(model)
    assert steps == 2  # both steps ran their forward, loss and backward under the modes
    changed = [n for n, p in after.items() if not torch.equal(before[n], p.detach())]
    assert len(changed) > 5  # and really trained


def test_flex_forward_reads_nothing_back():
    """FlexAttention has no backward on CPU (torch 2.13: NotImplementedError), so its part here is the
    forward: the BlockMask is built from the collated doc/part ids on the device, with no read-back."""
    from rmlab.data.collate import collate

    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared", attention="flex").eval()
    dm = build_datamodule(tokenizer=model.tokenizer, cache=False, simulator={"num_prompts": 8, "k": 3, "seed": 3},
                          max_length=128, min_prompt_tokens=8)
    dm.setup("fit")
    batch = collate(dm.train_groups[:4], model.tokenizer.pad_token_id, layout=model.batch_layout)
    assert batch.packed is not None and batch.packed.doc is not None
    from rmlab.models.packing import flex_block_mask

    with NoHostSyncFunctions(), NoHostSyncOps():
        block_mask = flex_block_mask(batch.packed, torch.device("cpu"))
    assert block_mask.shape[-2:] == (batch.packed.processed_tokens,) * 2
    with torch.no_grad():
        # flex_attention runs through torch.compile even uncompiled, which refuses a dispatch mode: the
        # forward is watched for method read-backs only.
        with NoHostSyncFunctions():
            got = model.score_batch(batch)
        model.forward_mode = "padded"
        torch.testing.assert_close(got, model.score_batch(batch), atol=1e-4, rtol=0)
