"""A training step reads nothing back from the device: forward, loss and backward make no ``.cpu()``,
``.tolist()``, ``.item()`` (nor ``bool()``/``int()`` of a tensor, nor an op whose output size depends on
the data), in every forward mode and with every loss a model trains with here (conf/loss/). The packed
layout is built when the batch is collated.

On CPU every tensor is a host tensor, so a read-back costs nothing here; the test makes each one raise
instead, inside the Lightning step (from ``on_train_batch_start``, after the batch transfer, to
``on_before_optimizer_step``, after the backward and the gradient-norm log), so a GPU step would never wait
for its kernels. The loss runs are built as ``python train.py loss=<name>`` builds them (Hydra compose, the
same model, loss, data and Trainer with train.py's callbacks: the non-finite guard, the gradient norm, the
val metrics, checkpoints), on simulator data with ties, K = 3..5 groups, ranks, ratings and strengths."""

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


class NoHostSyncMethods:
    """The banned methods replaced on the Tensor class itself for the window. Python code that the autograd engine
    runs in the backward (tensor hooks, activation checkpointing's recompute) runs outside the torch-function mode,
    and on the CPU ``.cpu()`` and ``.tolist()`` reach no dispatched op either: only the class sees them there."""

    def __enter__(self):
        self.saved = {}
        for fn, what in BANNED_METHODS.items():
            name = fn.__name__
            self.saved[name] = vars(torch.Tensor).get(name)

            def banned(*args, _what=what, **kwargs):
                raise HostSync(f"{_what} inside the training step")

            setattr(torch.Tensor, name, banned)
        return self

    def __exit__(self, *exc):
        for name, old in self.saved.items():
            if old is None:
                delattr(torch.Tensor, name)  # the method lives on the C base class: uncover it
            else:
                setattr(torch.Tensor, name, old)
        self.saved = {}


class Strict(L.Callback):
    """Both modes on from after the batch transfer until the backward is done. Put it first among the callbacks
    (its ``on_train_batch_start`` runs before the others'); ``StrictEnd``, last, closes the window after every
    other callback's ``on_before_optimizer_step`` (the gradient-norm monitor's)."""

    def __init__(self, close_here: bool = True):
        self.modes, self.steps, self.close_here = [], 0, close_here

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes = [NoHostSyncFunctions(), NoHostSyncOps(), NoHostSyncMethods()]
        for m in self.modes:
            m.__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.close_here:
            self.end()

    def on_exception(self, trainer, pl_module, exception):
        self.close()  # Lightning's teardown after a failure is not the step

    def end(self):
        if self.modes:
            self.steps += 1
        self.close()

    def close(self):
        for m in reversed(self.modes):
            m.__exit__(None, None, None)
        self.modes = []


class StrictEnd(L.Callback):
    def __init__(self, strict: Strict):
        self.strict = strict

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.strict.end()


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
    "mode,attention,checkpointing",
    [
        ("padded", "auto", False),
        ("packed", "sdpa", False),
        ("prefix_shared", "sdpa", False),
        ("auto", "sdpa", False),
        ("prefix_shared", "varlen", False),  # the reference varlen kernel on CPU: same indices as flash-attn's
        ("packed", "varlen", False),
        ("auto", "varlen", False),
        # model.gradient_checkpointing=true: the layers' forward runs again inside the backward
        ("padded", "auto", True),
        ("auto", "sdpa", True),
        ("prefix_shared", "varlen", True),
    ],
)
def test_training_step_reads_nothing_back(mode, attention, checkpointing):
    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode=mode, attention=attention,
                        gradient_checkpointing=checkpointing)
    assert getattr(model.hf, "is_activation_checkpointing", None) == checkpointing  # transformers >= 5.25's name
    assert model.forward_mode == mode
    if mode != "padded":
        assert model.batch_layout is not None and model.batch_layout.kernel == attention
    steps, before, after = _train_strictly(model)
    assert steps == 2  # both steps ran their forward, loss and backward under the modes
    unchanged = [n for n, p in after.items() if p.requires_grad and torch.equal(before[n], p.detach())]
    assert not unchanged, unchanged  # and really trained: every trainable parameter moved


def test_a_read_back_in_the_backward_is_caught():
    """Python code the autograd engine runs in the backward (a tensor hook, activation checkpointing's recompute)
    runs without the torch-function mode; a ``.tolist()`` or ``.cpu()`` there is caught all the same."""
    for read in (lambda g: g.tolist(), lambda g: g.cpu(), lambda g: g.numpy(), lambda g: bool(g.sum() > 0)):
        torch.manual_seed(0)
        model = build_model(config=TINY_LLAMA, tokenizer="byt5", forward_mode="prefix_shared", attention="sdpa")
        model.head.weight.register_hook(lambda g, read=read: (read(g), None)[1])  # runs in the backward
        with pytest.raises(HostSync):
            _train_strictly(model, steps=1)


# Every loss in conf/loss/ a model trains with on this machine, with the model its yaml picks (a model= of its own
# where the yaml names none), and the forward modes that model has. Generative heads (answer_ce: the pairwise
# judge; cloud: critique LM) are below.
SCALAR_LOSSES = ["bt", "logexp", "margin", "hinge", "center", "davidson", "rao_kupper", "plackett_luce", "grouped",
                 "regression", "scaled_bt"]
MODES = [("padded", "auto"), ("packed", "sdpa"), ("prefix_shared", "sdpa"), ("auto", "sdpa"),
         ("prefix_shared", "varlen")]
LOSS_RUNS = [
    *[(loss, ["model=tiny_llama"], mode) for loss in SCALAR_LOSSES for mode in MODES],
    # Centering by prompt (group sums of the rewards) and the other margin sources that read the batch.
    ("center", ["model=tiny_llama", "loss.center=group"], MODES[2]),
    ("margin", ["model=tiny_llama", "loss.source=rating"], MODES[2]),
    ("hinge", ["model=tiny_llama", "loss.source=strength"], MODES[2]),
    ("plackett_luce", ["model=tiny_llama", "loss.ties=efron"], MODES[2]),
    ("davidson", ["model=tiny_llama", "loss.learn_tie_param=true"], MODES[2]),
    *[("odin", [], mode) for mode in MODES],  # the yaml picks model=odin (two heads)
    ("attributes", [], MODES[0]),  # the yaml picks model=attributes (padded forward only)
    ("grm", [], MODES[0]),  # the yaml picks model=tiny_llama; the LM term's forward is padded
    # Generative heads, one forward each: the pairwise judge's answer cross-entropy (the yaml picks the judge), and
    # CLoud's critique LM + BT on critiques in the data (stage 1 of experiment=cloud; stage 2 generates critiques
    # with the critic, a host loop by nature, docs/heads.md).
    ("answer_ce", [], None),
    ("cloud", ["model=cloud"], None),
]
# Simulator data every loss has something to read in: ties (tie_band), K = 3..5 responses (rank, group_weight),
# 1-5 ratings (score), 0/1 labels, attribute ratings, strengths.
SIM = ["data.simulator.num_prompts=24", "data.simulator.k=3", "data.simulator.k_max=5", "data.simulator.tie_band=0.6",
       "data.cache=false", "data.max_tokens=2048", "data.max_length=128",
       "data.min_prompt_tokens=8", "data.val_fraction=0.2", "data.max_groups=4", "seed=3"]


def _train_as_train_py(name: str, overrides: list[str], mode: tuple[str, str] | None, tmp_path, steps: int = 2,
                       callbacks: tuple = ()):
    """``python train.py loss=<name> ...`` up to the fit: the config composed by Hydra and checked as train.py
    checks it, the model, loss, data and module instantiated as rmlab.train.run does, its ``build_trainer`` (with
    its callbacks), then ``steps`` steps under the modes."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    from rmlab.losses.critique import CritiqueLoss
    from rmlab.train import build_trainer
    from rmlab.validate import check_config
    from tests.conftest import compose

    # Generative heads have one forward (no forward_mode key): mode None.
    modes = [] if mode is None else [f"model.forward_mode={mode[0]}", f"model.attention={mode[1]}"]
    cfg = compose([f"loss={name}", *overrides, *modes, *SIM, f"trainer.max_steps={steps}", "+trainer.limit_val_batches=0",
                   "module.lr=1e-2", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "threads=1"], tmp_path)
    check_config(cfg, entry="train")
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="all")
    loss = instantiate(cfg.loss, _convert_="all")
    if model.writes_critiques and not loss.needs_heads:
        loss = CritiqueLoss(loss)
    dm = instantiate(cfg.data, tokenizer=model.tokenizer, output_dir=str(tmp_path), template=model.group_template,
                     _convert_="all")
    dm.layout = model.batch_layout
    module = instantiate(cfg.module, model=model, loss=loss, _convert_="all")
    trainer = build_trainer(cfg, [CSVLogger(str(tmp_path), name="csv")], resuming=False)
    strict = Strict(close_here=False)
    trainer.callbacks.insert(0, strict)
    trainer.callbacks[-1:-1] = list(callbacks)  # before the checkpoint callback, which Lightning keeps last
    trainer.callbacks.append(StrictEnd(strict))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        strict.close()
    return strict.steps, before, dict(model.named_parameters()), trainer, loss


@pytest.mark.parametrize(
    "name,overrides,mode",
    [pytest.param(n, o, m, id="-".join([n, *(x.split(".")[-1] for x in o if not x.startswith("model=")), *(m or ())]))
     for n, o, m in LOSS_RUNS],
)
def test_every_loss_trains_without_a_read_back(name, overrides, mode, tmp_path):
    steps, before, after, trainer, loss = _train_as_train_py(name, overrides, mode, tmp_path)
    assert steps == 2  # both steps ran their forward, loss, backward and the callbacks' hooks under the modes
    unchanged = [n for n, p in after.items() if p.requires_grad and torch.equal(before[n], p.detach())]
    # and really trained: every trainable parameter moved, but CLoud's LM head: the simulator's records hold no
    # critique, so the critique LM term has no token to train it on (its reward head and backbone train)
    assert unchanged == (["hf.lm_head.weight"] if name == "cloud" else []), unchanged
    # The metrics stayed on the device until Lightning logged them, after the step: real values reached it.
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert 0.0 < logged["train/loss_epoch"] < 1e3, logged
    assert 0.0 <= logged["train/acc_epoch"] <= 1.0 and 0.0 <= logged["train/tie_rate"] <= 1.0, logged
    assert logged["train/grad_norm"] > 0.0, logged


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


class ItemLoss(BTLoss):
    """BT that reads its loss back to the host, as a loss with ``if loss.item() > ...`` would."""

    def objective(self, rewards, batch):
        out = super().objective(rewards, batch)
        if out.loss.item() > 1e9:
            raise AssertionError("unreachable")
        return out


def test_a_read_back_in_a_loss_is_caught(tmp_path):
    """The harness of the loss runs fails on a loss that reads back: the window covers the loss train.py builds."""
    with pytest.raises(HostSync, match="Tensor.item"):
        _train_as_train_py("bt", ["model=tiny_llama", "loss._target_=tests.test_no_host_sync.ItemLoss"],
                           MODES[0], tmp_path)


class PoisonHead(L.Callback):
    """NaN reward-head weights from optimizer step ``step`` on; keeps the other weights as they were then."""

    def __init__(self, step: int):
        self.step, self.kept = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.head.weight.fill_(float("nan"))
            self.kept = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


@pytest.mark.parametrize("fused", [False, True])
def test_the_nonfinite_guard_reads_after_the_step(fused, tmp_path, monkeypatch):
    """The guard's flag is made on the device in the step and read after the optimizer step (outside the
    window): the run still stops naming the step that went bad, before any checkpoint of it. With a fused AdamW
    (CUDA's; forced here on the CPU) the bad step's update is skipped on the device: every weight is as it was."""
    import rmlab.module

    if fused:
        monkeypatch.setattr(rmlab.module, "fused_adamw", lambda params: {"fused": True})
    poison = PoisonHead(step=1)
    with pytest.raises(FloatingPointError, match="at global step 1;") as err:
        _train_as_train_py("bt", ["model=tiny_llama"], MODES[2], tmp_path, steps=3, callbacks=(poison,))
    assert "nonfinite-step1.ckpt" in str(err.value)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # no checkpoint of the bad step
    state = torch.load(tmp_path / "checkpoints" / "nonfinite-step1.ckpt", weights_only=False)
    assert state["nonfinite"]["global_step"] == 1
    weights = state["state_dict"]
    if fused:  # the update was skipped: the state is the one that produced the NaN
        for n, before in poison.kept.items():
            torch.testing.assert_close(weights[f"model.{n}"], before, rtol=0, atol=0, equal_nan=True, msg=n)
    else:  # the CPU's foreach AdamW stepped on NaN gradients
        assert torch.isnan(weights["model.hf.model.norm.weight"]).all()
