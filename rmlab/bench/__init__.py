"""The throughput benchmark against TRL's RewardTrainer: ``python -m rmlab.bench`` (docs/bench.md)."""
