"""rmlab tests (a package, so `tests.conftest` is ours even where another package installs a top-level `tests`, as rewardbench 0.1.4 does)."""
