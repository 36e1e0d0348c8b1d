"""What the distributed strategy does to the weights: whole on every rank, or sharded (FSDP, DeepSpeed ZeRO-3)."""

from __future__ import annotations


def deepspeed_stage(strategy) -> int:
    """The ZeRO stage of a Lightning DeepSpeedStrategy (0 when it says none)."""
    config = getattr(strategy, "config", None) or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def weight_sharding(trainer) -> str | None:
    """How the strategy splits the weights across ranks, or None when every rank holds them whole (one device,
    DDP, FSDP NO_SHARD or on one device, DeepSpeed ZeRO-1/2)."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if trainer.world_size <= 1:
        return None
    if name == "FSDPStrategy":
        sharding = getattr(strategy, "sharding_strategy", None)
        return None if getattr(sharding, "name", str(sharding)) == "NO_SHARD" else "fsdp"
    if name == "DeepSpeedStrategy":
        return "deepspeed_zero3" if deepspeed_stage(strategy) >= 3 else None
    return None
