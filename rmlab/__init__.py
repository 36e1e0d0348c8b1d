"""rmlab: a reward-model training lab for RLHF."""

__version__ = "0.1.0"

# ${rmlab.unique:} in conf/*.yaml's run dirs: train.py and eval.py import rmlab before Hydra resolves them.
from rmlab.rundir import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()
