"""Liger Kernel's fused Triton kernels on the backbone: ``model.liger=true`` (``pip install 'rmlab[liger]'``, a GPU).

``apply_liger`` hands a built transformers model to Liger's per-architecture function
(``liger_kernel.transformers.apply_liger_kernel_to_<type>(model=...)``) asking for three kernels:

- **RMSNorm**: every norm of the decoder (two per layer and the final one) runs Liger's forward;
- **SwiGLU**: every gated MLP runs Liger's fused ``silu(gate) * up``;
- **RoPE**: the rotary embedding of the attention. Liger swaps the function in transformers' module of that
  architecture (``modeling_llama.apply_rotary_pos_emb``), so it holds process-wide: a model of the same type built
  later in the same process gets it too (and Liger's classes for its new norms and MLPs).

Never Liger's cross-entropy or fused linear cross-entropy. The scalar, attribute and ODIN heads have no LM loss;
the heads that do read the LM head (verifier and judge: two of its rows; CLoud's critique term and GRM's
``response_logp``: logits at the critique or response tokens only) compute those logits from the backbone's
hidden states themselves and never call the causal LM's ``forward`` with labels, which is the only place Liger's
fused linear cross-entropy plugs in; asking for it would replace the forward that generation uses and fuse nothing.

Where it runs: in ``load_backbone``, after the weights are loaded and the embeddings resized, before gradient
checkpointing, LoRA (rmlab.models.lora) and ``torch.compile`` (rmlab.models.packing) wrap the modules. The verifier
and judge builders apply it themselves, after their start-up check of the LM head (a forward on the CPU, where the
kernels cannot run); checkpointing calls the layers, which look the patched forwards up at call time. The weights
are untouched (Liger's modules have the same parameters), so checkpoints and exports load with or without it.
What was applied is kept on the model (``liger_report``), logged, and written to the run's metrics.json (``liger``).
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

from rmlab.models.base import ENCODER_TYPES

log = logging.getLogger("rmlab")

INSTALL = "pip install 'rmlab[liger]'"
# transformers model_type -> the suffix of Liger's apply_liger_kernel_to_<suffix>. Decoders whose norms are RMSNorm,
# whose MLP is SwiGLU and whose attention uses the standard RoPE function; each is checked on CPU by
# tests/test_liger.py (the patching, not the kernels). Another type Liger supports can be added here once checked.
SUPPORTED = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
KERNELS = ("rms_norm", "rope", "swiglu")  # what rmlab asks Liger for; the cross-entropy kernels stay off
_REPORT_ATTR = "_rmlab_liger"  # set on the transformers model: what was applied (liger_report)


def check_liger_type(model_type: str) -> None:
    """An encoder or a type rmlab does not apply Liger to is an error that says what to do."""
    if model_type in ENCODER_TYPES:
        raise ValueError(
            f"model.liger=true: this backbone is an encoder ({model_type}, e.g. model=minilm); Liger's kernels "
            f"(RMSNorm, RoPE, SwiGLU) are for decoder LMs ({', '.join(sorted(SUPPORTED))}) and an encoder has none "
            "of them. Set model.liger=false, or use a causal LM (model=tiny_llama, model=hf model.name_or_path=...)"
        )
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model.liger=true: rmlab applies Liger's kernels to model types {', '.join(sorted(SUPPORTED))}; this "
            f"backbone is {model_type!r}. Set model.liger=false, or add the type to rmlab.models.liger.SUPPORTED "
            "if liger_kernel.transformers has apply_liger_kernel_to_<type> for it (and extend tests/test_liger.py)"
        )


def check_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "model.liger=true needs a CUDA GPU: Liger's kernels are Triton kernels and do not run on CPU. Set "
            "model.liger=false on this machine (the weights are the same with or without Liger, so a checkpoint "
            "or export trained with it loads without it)"
        )


def import_liger() -> Any:
    """``liger_kernel.transformers``, or an error that names the install command."""
    try:
        import liger_kernel.transformers as lk  # optional (rmlab[liger]): only with model.liger=true
    except ImportError as e:
        raise ImportError(
            f"model.liger=true needs the liger-kernel package (and Triton, which CUDA builds of torch bring): "
            f"{INSTALL}, or set model.liger=false ({e})"
        ) from e
    return lk


def apply_liger(hf: nn.Module, require_cuda: bool = True) -> dict[str, Any]:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on ``hf`` (a transformers model, before LoRA, gradient
    checkpointing and compile), in place. Returns what was applied (also ``liger_report(hf)``).

    ``require_cuda=False`` patches on a machine without CUDA (tests check the patching; the patched forward
    cannot run there)."""
    model_type = str(getattr(hf.config, "model_type", ""))
    check_liger_type(model_type)
    if require_cuda:
        check_cuda()
    lk = import_liger()
    apply = getattr(lk, f"apply_liger_kernel_to_{SUPPORTED[model_type]}", None)
    if apply is None:
        raise ImportError(
            f"the installed liger-kernel has no apply_liger_kernel_to_{SUPPORTED[model_type]}: upgrade it "
            f"({INSTALL} --upgrade) or set model.liger=false"
        )
    apply(model=hf, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    if "forward" in vars(hf):  # rmlab reads hidden states from the base model; the top-level forward must stay
        raise RuntimeError(f"liger-kernel replaced {type(hf).__name__}.forward although no cross-entropy kernel was asked for")
    modules: dict[str, int] = {}
    for m in hf.modules():
        name = m._get_name()
        if name.startswith("Liger"):
            modules[name] = modules.get(name, 0) + 1
    modeling = sys.modules[type(hf).__module__]
    rope = getattr(getattr(modeling, "apply_rotary_pos_emb", None), "__module__", "").startswith("liger_kernel")
    report = {
        "model_type": model_type,
        "kernels": [k for k, on in (("rms_norm", _has(modules, "RMSNorm")), ("rope", rope), ("swiglu", _has(modules, "MLP")))
                    if on],
        "modules": dict(sorted(modules.items())),
        "liger_kernel": _version(),
    }
    missing = [k for k in KERNELS if k not in report["kernels"]]
    if missing:
        raise RuntimeError(
            f"liger-kernel {report['liger_kernel']} did not apply {', '.join(missing)} to this {model_type} backbone "
            f"(it patched {report['modules'] or 'no module'}); its transformers support may lag the installed "
            "transformers. Set model.liger=false, or install a liger-kernel that supports it"
        )
    object.__setattr__(hf, _REPORT_ATTR, report)  # a plain attribute: not a parameter, not in the state dict
    log.info(
        "model.liger: Liger kernels on the %s backbone: %s (%s)", model_type, ", ".join(report["kernels"]),
        ", ".join(f"{k} x{v}" for k, v in report["modules"].items()),
    )
    return report


def _has(modules: dict[str, int], part: str) -> bool:
    return any(part in name for name in modules)


def _version() -> str:
    try:
        return version("liger-kernel")
    except PackageNotFoundError:  # a source checkout without metadata still reports the rest
        return "unknown"


def liger_report(model: nn.Module) -> dict[str, Any] | None:
    """What ``apply_liger`` applied to a reward model's backbone (``model.hf``) or a transformers model; None if off."""
    hf = getattr(model, "hf", model)
    return getattr(hf, _REPORT_ATTR, None)
