"""The one loop from batches to rewards: validation reports, ``eval.py``, ``rmlab.score`` and the export's
reward statistics all score through ``score_batches``; training scores through the same ``score_heads``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from rmlab.models.base import RewardModel
from rmlab.models.liger import liger_report


@dataclass
class Scored:
    """One scored batch: the batch as given (on its own device), its rewards and named extra outputs on CPU."""

    batch: Any
    rewards: torch.Tensor  # [N] float32
    heads: dict[str, Any] = field(default_factory=dict)  # tensors [N, ...]; a writing model's texts: lists of [N] str


def scoring_device(model: RewardModel, device: str | torch.device | None = None) -> torch.device:
    """``device``, else the model's, except that a model with Liger's kernels (model.liger) scores on the GPU: Lightning
    leaves a model on the CPU after ``fit``, where Triton kernels cannot run (the head report and the export's
    reward statistics score it there)."""
    dev = torch.device(device) if device is not None else model.device
    if dev.type == "cpu" and device is None and liger_report(model) is not None and torch.cuda.is_available():
        return torch.device("cuda")
    return dev


def score_batches(
    model: RewardModel,
    batches: Iterable,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "scoring",
    total: int | None = None,
) -> Iterator[Scored]:
    """Score every batch in eval mode without gradients; the model's mode is restored afterwards. ``total``:
    the number of batches, for the progress bar's ETA when ``batches`` has no length."""
    dev = scoring_device(model, device)
    model.to(dev)
    was = model.training
    model.eval()
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch", leave=False, total=total)
    try:
        with torch.inference_mode():
            for batch in it:
                rewards, heads = model.score_heads(batch.to(dev))
                if getattr(batch, "packed", None) is not None:  # callers may keep every batch: not its masks
                    batch = dataclasses.replace(batch, packed=None)
                heads = {k: v.float().cpu() if isinstance(v, torch.Tensor) else v for k, v in heads.items()}
                yield Scored(batch, rewards.float().cpu(), heads)
    finally:
        model.train(was)
