"""rmlab: a reward-model training lab for RLHF."""

__version__ = "0.1.0"
