"""Evaluate a reward model: python eval.py ckpt_path=<run>/checkpoints/last.ckpt [data=...]
or python eval.py model.name_or_path=<run>/export data=...; a published benchmark: benchmark=rewardbench
(rewardbench2, rm_bench, best_of_k). See docs/eval.md."""

import hydra
from omegaconf import DictConfig

import rmlab  # noqa: F401  registers ${rmlab.unique:}, used by the run dir in conf/*.yaml
from rmlab.overrides import main_naming_unknown_keys  # light: hydra and omegaconf only


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from rmlab.validate import ConfigError, check_or_exit

    check_or_exit(cfg, "eval")  # before Lightning and transformers load: a bad setting fails in seconds
    from rmlab.checkpoint import CheckpointError
    from rmlab.data.sources import DataError
    from rmlab.evaluate import run  # lazy: `python eval.py --help` stays fast

    if cfg.get("benchmark"):
        from rmlab.benchmarks.runner import run  # the benchmark's items, rules and report
    from rmlab.rundir import RunDirBusy

    try:
        run(cfg)
    except DataError as e:  # bad input: the file, the line, the field and what to do; no traceback
        raise SystemExit(f"rmlab: bad input: {e}") from None
    except ConfigError as e:  # bad settings: each key, its value and what is valid; no traceback
        raise SystemExit(f"rmlab: bad config: {e}") from None
    except (CheckpointError, RunDirBusy) as e:  # a broken or foreign checkpoint or export, a run dir in use
        raise SystemExit(f"rmlab: {e}") from None


if __name__ == "__main__":
    main_naming_unknown_keys(main, __file__, "eval")
