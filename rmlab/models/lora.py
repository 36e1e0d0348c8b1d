"""LoRA through peft: with ``model.lora.r > 0`` only low-rank adapters and the reward head train.

- The head is trained and saved. It starts random, so a LoRA run with a frozen head fits adapters to
  noise. peft's ``modules_to_save`` keeps a trainable copy of it (``score`` in causal LMs, ``classifier``
  in encoders), and the adapter folder holds that copy beside the adapters.
- The export merges the adapters into the backbone (``merge_and_unload``), so the exported model is a
  plain transformers model that scores without peft.

peft wraps the Hugging Face model *in place*: the LoRA layers live inside ``ScalarRewardModel.hf``, so the
RewardModel's forward, pooling and Lightning checkpoints need no change. The PeftModel wrapper itself is
kept on ``hf`` unregistered (it contains ``hf``; registering it would list every weight twice).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

HEAD_NAMES = ("score", "classifier")  # the reward head's attribute across transformers architectures


def apply_lora(
    hf: nn.Module,
    r: int = 0,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
    **_: Any,
) -> nn.Module:
    """Inject LoRA adapters into ``hf`` (an ``AutoModelForSequenceClassification``) and return the PeftModel."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model  # optional dependency (rmlab[lora])
    except ImportError as e:
        raise ImportError("model.lora needs peft: pip install 'rmlab[lora]'") from e
    if r <= 0:
        raise ValueError(f"model.lora.r must be > 0 to use LoRA, got {r}")
    head = [n for n in HEAD_NAMES if isinstance(getattr(hf, n, None), nn.Module)]
    if not head:
        raise ValueError(f"{type(hf).__name__} has no `score` or `classifier` head for modules_to_save")
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=int(r),
        lora_alpha=float(alpha) if alpha is not None else 2.0 * r,
        lora_dropout=float(dropout),
        target_modules=list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules,
        modules_to_save=head + [m for m in (modules_to_save or []) if m not in head],
    )
    peft_model = get_peft_model(hf, config)
    object.__setattr__(hf, "_rmlab_peft", peft_model)  # unregistered on purpose (see the module docstring)
    return peft_model


def peft_of(model: nn.Module) -> nn.Module | None:
    """The PeftModel behind a reward model, or None when it has no LoRA."""
    return getattr(getattr(model, "hf", None), "_rmlab_peft", None)


def merge_lora(model: nn.Module, adapter_dir: str | os.PathLike) -> Path:
    """Save the adapter (with the head) to ``adapter_dir``, then fold the adapters into the backbone in
    place, so ``model.save_pretrained`` writes a plain transformers model. Returns ``adapter_dir``."""
    peft_model = peft_of(model)
    if peft_model is None:
        raise ValueError("this model has no LoRA adapters to merge")
    out = Path(adapter_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    merged = peft_model.merge_and_unload()  # the same hf object, LoRA folded in, the trained head put back
    object.__delattr__(merged, "_rmlab_peft")
    model.hf = merged
    model.backbone_replaced()  # the head module object changed: the model points at the new one
    return out
