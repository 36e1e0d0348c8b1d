"""model.liger (rmlab/models/liger.py): Liger's RMSNorm/RoPE/SwiGLU kernels on the backbone.

The kernels are Triton and need a GPU, so on CPU the tests check the error paths (not installed, an encoder or an
unsupported type, no CUDA, the config check), that a checkpoint trained with Liger is scored without it, and, when
liger-kernel imports here (it needs triton), that the patching replaces the right modules' forwards and leaves the
weights and the model's own forward alone, without running a patched forward.
"""

from __future__ import annotations

import sys

import pytest
import torch

from rmlab.models import build_model
from rmlab.models.liger import SUPPORTED, apply_liger, liger_report
from rmlab.models.scoring import scoring_device
from tests.conftest import TINY_LLAMA, compose

pytestmark = pytest.mark.usefixtures("one_thread")

try:
    import liger_kernel.transformers as lk
except Exception:  # noqa: BLE001 - not installed, or installed without triton: either way the patch tests skip
    lk = None
needs_liger = pytest.mark.skipif(
    lk is None, reason="liger-kernel does not import here (pip install 'rmlab[liger]'; it needs triton)"
)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")

TINY_BERT = dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TINY_GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=1, n_head=2, n_positions=256)


def test_off_by_default_and_the_yaml_default_is_off(tmp_path):
    model = build_model(config=TINY_LLAMA, tokenizer="byt5")
    assert liger_report(model) is None and scoring_device(model) == model.device
    assert "forward" not in vars(model.hf.base_model.layers[0].mlp)  # the class's own forward
    for name in ("tiny_llama", "hf", "minilm", "generative_verifier", "cloud"):
        assert compose([f"model={name}"], tmp_path).model.liger is False


def test_not_installed_names_the_extra(monkeypatch):
    hf = build_model(config=TINY_LLAMA, tokenizer="byt5").hf
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel now fails, installed or not
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ImportError, match=r"needs the liger-kernel package .*pip install 'rmlab\[liger\]'"):
        apply_liger(hf, require_cuda=False)
    assert liger_report(hf) is None


@no_cuda
def test_no_cuda_is_an_error_that_says_what_to_do():
    # Through build_model: model.liger reaches load_backbone, which refuses before patching anything.
    with pytest.raises(RuntimeError, match=r"model.liger=true needs a CUDA GPU: .*Triton.*Set model.liger=false"):
        build_model(config=TINY_LLAMA, tokenizer="byt5", liger=True)


@pytest.mark.parametrize(
    "config, match",
    [
        (TINY_BERT, r"this backbone is an encoder \(bert, e.g. model=minilm\).*Set model.liger=false"),
        (TINY_GPT2, r"model types llama, mistral, phi3, qwen2, qwen3; this backbone is 'gpt2'. Set model.liger=false"),
    ],
)
def test_an_encoder_or_an_unsupported_type_is_refused_before_anything_else(config, match):
    # Checked before CUDA and the import, so it is the error on any machine.
    with pytest.raises(ValueError, match=match):
        build_model(config=config, tokenizer="byt5", liger=True)


def test_config_check_names_the_key(tmp_path):
    from rmlab.validate import ConfigError, check_config

    with pytest.raises(ConfigError, match=r"model.liger=true: .*decoder LMs and this model is an encoder"):
        check_config(compose(["model=minilm", "model.liger=true"], tmp_path))
    with pytest.raises(ConfigError, match=r"model.liger=fast.*must be true or false"):
        check_config(compose(["model=tiny_llama", "model.liger=fast"], tmp_path))
    with pytest.raises(ConfigError, match=r"model.liger=true: .*trainer.accelerator=cpu .*use trainer=gpu"):
        check_config(compose(["model=tiny_llama", "model.liger=true"], tmp_path))  # trainer=cpu, the default
    check_config(compose(["model=tiny_llama", "model.liger=true", "trainer=gpu"], tmp_path))  # CUDA: at build time


@pytest.mark.slow
def test_a_checkpoint_trained_with_liger_is_scored_without_it(tmp_path):
    """The training run's model.liger is how it ran, not what the weights are: eval.py on a checkpoint follows the
    eval command's model.liger (default false), so a run trained with Liger on a GPU is scored on a CPU."""
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    from rmlab.evaluate import find_run_config, load_reward_model
    from rmlab.train import run

    cfg = compose(["model=tiny_llama", "trainer.max_steps=1", "data.simulator.num_prompts=40", "threads=1",
                   "export=false"], tmp_path / "run")
    run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_cfg = find_run_config(str(ckpt))
    run_cfg.model.liger = True  # as if it had trained on a GPU with model.liger=true
    model = load_reward_model(str(ckpt), None, run_cfg)
    assert liger_report(model) is None and not model.training
    if not torch.cuda.is_available():  # asking for it here is the CUDA error, so the command's setting is the one used
        with pytest.raises(InstantiationException, match="needs a CUDA GPU"):  # Hydra wraps build_model's error
            load_reward_model(str(ckpt), OmegaConf.create({"liger": True}), run_cfg)


# --- the patching itself: needs liger-kernel to import (CPU is fine: nothing patched runs) ---

CONFIGS = {
    mt: dict(TINY_LLAMA, model_type=mt, **({"eos_token_id": 1, "bos_token_id": 1} if mt == "phi3" else {}))
    for mt in SUPPORTED
}


@pytest.fixture
def restore_transformers(monkeypatch):
    """Liger swaps names in transformers' modeling module of each architecture (the RoPE function, the norm and MLP
    classes) process-wide; put them back after the test so later tests build plain models."""
    import importlib

    for mt in SUPPORTED:
        mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
        for name, value in list(vars(mod).items()):
            if name == "apply_rotary_pos_emb" or name.endswith(("RMSNorm", "MLP")):
                monkeypatch.setattr(mod, name, value)


@needs_liger
@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_patch_swaps_norms_mlps_and_rope_and_keeps_the_weights(model_type, restore_transformers):
    from liger_kernel.transformers import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    model = build_model(config=CONFIGS[model_type], tokenizer="byt5")
    hf, base = model.hf, model.hf.base_model
    mlp_cls = {"phi3": lk.LigerPhi3SwiGLUMLP}.get(model_type, lk.LigerSwiGLUMLP)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    norms = [base.norm] + [n for layer in base.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(n.forward.__func__ is not LigerRMSNorm.forward for n in norms)

    report = apply_liger(hf, require_cuda=False)

    assert report["kernels"] == ["rms_norm", "rope", "swiglu"] and report["model_type"] == model_type
    assert liger_report(model) == report  # through the reward model too (what train.py writes to metrics.json)
    for n in norms:
        assert n.forward.__func__ is LigerRMSNorm.forward and n._get_name() == "LigerRMSNorm"
    for layer in base.layers:
        assert layer.mlp.forward.__func__ is mlp_cls.forward
    n_norms = sum(1 for m in hf.modules() if m._get_name() == "LigerRMSNorm")
    # Qwen3 also normalises its queries and keys (q_norm, k_norm): two more RMSNorms per layer.
    assert n_norms == (4 if model_type == "qwen3" else 2) * len(base.layers) + 1
    assert report["modules"] == {"LigerRMSNorm": n_norms, mlp_cls.__name__: len(base.layers)}
    assert sys.modules[type(hf).__module__].apply_rotary_pos_emb is liger_rotary_pos_emb
    assert "forward" not in vars(hf)  # no fused linear cross-entropy: the model's own forward is kept
    after = hf.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


@needs_liger
def test_build_model_applies_it_before_lora_and_checkpointing(monkeypatch, restore_transformers):
    """The order in load_backbone / the head builder: Liger on the plain modules, then gradient checkpointing and
    LoRA around them (LoRA's layers sit inside Liger's MLP, whose forward calls them). CUDA is reported present so
    that build_model gets past its check; no patched forward runs."""
    pytest.importorskip("peft")
    from peft.tuners.lora import Linear as LoraLinear

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5", liger=True, gradient_checkpointing=True,
                        lora={"r": 4, "target_modules": "all-linear"})
    assert liger_report(model)["kernels"] == ["rms_norm", "rope", "swiglu"]
    # After fit Lightning leaves the model on the CPU; the head report and the export's statistics score it on the GPU.
    assert model.device.type == "cpu" and scoring_device(model).type == "cuda"
    assert scoring_device(model, "cpu").type == "cpu"  # a device asked for is the device used
    mlp = model.hf.base_model.layers[0].mlp
    assert mlp.forward.__func__ is lk.LigerSwiGLUMLP.forward and isinstance(mlp.gate_proj, LoraLinear)
    assert model.hf.is_activation_checkpointing


@needs_liger
@pytest.mark.parametrize("head", ["verifier", "judge", "cloud"])
def test_heads_that_read_the_lm_head_get_it_without_the_fused_cross_entropy(head, monkeypatch, restore_transformers):
    """Verifier and judge run a start-up forward on the CPU (check_restricted_head), so Liger goes on after it (on
    before, that forward would call a Triton kernel on CPU tensors). Their LM head, and the causal LM's own forward
    (which generation calls), stay transformers' own: no fused linear cross-entropy."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    options = {"answers": ["Y", "N"] if head == "verifier" else ["A", "B"]} if head != "cloud" else {}
    model = build_model(head=head, config=TINY_LLAMA, tokenizer="byt5", liger=True, **options)
    assert liger_report(model)["kernels"] == ["rms_norm", "rope", "swiglu"]
    assert model.hf.base_model.layers[0].mlp.forward.__func__ is lk.LigerSwiGLUMLP.forward
    assert "forward" not in vars(model.hf) and "forward" not in vars(model.lm_head)


def test_the_run_summary_names_the_kernels_only_when_on():
    from rmlab.summary import format_summary

    s = dict(run_dir="r", val_acc=0.5, oracle_acc=0.6, length_acc=0.4, train_steps=3, minutes=0.1, metrics={})
    assert "Liger" not in format_summary(s)
    text = format_summary({**s, "liger": {"kernels": ["rms_norm", "rope", "swiglu"], "modules": {}}})
    assert "  Liger kernels (model.liger)       rms_norm, rope, swiglu" in text.splitlines()


def test_liger_is_a_runtime_key_for_resume():
    """Turning Liger on or off does not change the weights: resuming across it is allowed, and a checkpoint saved
    before the key existed is not refused for lacking it."""
    from rmlab.checkpoint import architecture_diff

    saved = {"config": {"hidden_size": 64}, "head": "scalar"}
    assert architecture_diff(saved, {**saved, "liger": True}) == []
    assert architecture_diff({**saved, "liger": False}, {**saved, "liger": True}) == []
    assert architecture_diff(saved, {"config": {"hidden_size": 32}, "head": "scalar", "liger": True}) == [
        "model.config.hidden_size: checkpoint 64, this config 32"
    ]


def test_architecture_diff_names_the_model_first_and_reads_none_as_unset():
    """A tiny_llama checkpoint met with the MiniLM config: the message leads with the keys that name the model
    (class, name_or_path, tokenizer), and ``config: None`` is not listed as a difference of its own ("checkpoint
    '<unset>', this config None" led the message before, and the names fell under "and 2 more")."""
    from rmlab.checkpoint import architecture_diff

    saved = {"_target_": "rmlab.models.builder.build_model", "name_or_path": None, "tokenizer": "byt5",
             "config": {"hidden_size": 64, "num_hidden_layers": 2}, "pooling": "last", "head": "scalar"}
    current = {"_target_": "rmlab.models.builder.build_model", "name_or_path": "minilm", "tokenizer": None,
               "config": None, "pooling": "mean", "head": "scalar"}
    assert architecture_diff(saved, current) == [
        "model.name_or_path: checkpoint <unset>, this config 'minilm'",
        "model.tokenizer: checkpoint 'byt5', this config <unset>",
        "model.config.hidden_size: checkpoint 64, this config <unset>",
        "model.config.num_hidden_layers: checkpoint 2, this config <unset>",
        "model.pooling: checkpoint 'last', this config 'mean'",
    ]
