"""``data.max_tokens=auto``: the token budget of a batch, sized to the device from a short memory probe.

On a GPU the model runs two synthetic training forwards and backwards (one row of ``max_length`` and one
of ``2 x max_length`` tokens, in the precision it will train in; a single causal sequence, so at least the memory
of a packed row of as many tokens, whose segments attend within themselves only) and the peak memory of each gives
the bytes a token costs and the fixed part (weights, gradients); AdamW's two fp32 states per trained
parameter are added, and the budget is what fits in ``fraction`` of the device's memory, in whole rows of
``max_length``. ``model.gradient_checkpointing=true`` lowers the bytes per token, so the probe, which runs
the model as built, gives it a larger budget by itself.

On CPU there is no device memory to fill and host memory is rarely what limits a run, so ``auto`` is
``CPU_ROWS x max_length`` tokens (8 rows of the longest length: the benchmark's budget) without a probe.
"""

from __future__ import annotations

import logging

import torch

from rmlab.models.base import RewardModel

log = logging.getLogger(__name__)
CPU_ROWS = 8


def token_budget(model: RewardModel, max_length: int, device: str | None = None, fraction: float = 0.85,
                 bf16: bool = False) -> int:
    """Tokens per batch for ``data.max_tokens=auto`` (module docstring)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        budget = CPU_ROWS * max_length
        log.info("data.max_tokens=auto on CPU: %d tokens (%d rows of data.max_length=%d), no probe", budget, CPU_ROWS, max_length)
        return budget
    was_device, was_training = next(model.parameters()).device, model.training
    model.to(dev).train()
    vocab = model.hf.get_input_embeddings().num_embeddings
    peaks = []
    for n in (max_length, 2 * max_length):
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        ids = torch.randint(0, vocab, (1, n), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            h = model(ids, torch.ones_like(ids))
        h.float().sum().backward()
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev))
        model.zero_grad(set_to_none=True)
    per_token = max(1.0, (peaks[1] - peaks[0]) / max_length)
    fixed = peaks[0] - per_token * max_length
    adam = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = torch.cuda.get_device_properties(dev).total_memory
    rows = int((fraction * total - fixed - adam) // (per_token * max_length))
    model.to(was_device).train(was_training)
    budget = max(1, rows) * max_length
    log.info("data.max_tokens=auto: %d tokens (%.0f KB a token, %.1f GB fixed + %.1f GB AdamW of %.1f GB)", budget,
             per_token / 1024, fixed / 2**30, adam / 2**30, total / 2**30)
    return budget
