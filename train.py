"""Train a reward model: ``python train.py [group=option ...] [key=value ...]``. See README.md."""

import hydra
from omegaconf import DictConfig

import rmlab  # noqa: F401  registers ${rmlab.unique:}, used by the run dir in conf/*.yaml
from rmlab.overrides import main_naming_unknown_keys  # light: hydra and omegaconf only


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from rmlab.validate import ConfigError, check_or_exit

    check_or_exit(cfg, "train")  # before Lightning and transformers load: a bad setting fails in seconds
    from rmlab.checkpoint import CheckpointError
    from rmlab.data.sources import DataError
    from rmlab.rundir import RunDirBusy
    from rmlab.train import run

    try:
        summary = run(cfg)
    except DataError as e:  # bad input: the file, the line, the field and what to do; no traceback
        raise SystemExit(f"rmlab: bad input: {e}") from None
    except ConfigError as e:  # bad settings: each key, its value and what is valid; no traceback
        raise SystemExit(f"rmlab: bad config: {e}") from None
    except (CheckpointError, RunDirBusy) as e:  # a broken or foreign checkpoint, a run dir in use: what to do
        raise SystemExit(f"rmlab: {e}") from None
    return summary.get("val_acc")  # the value an Optuna sweep optimizes


if __name__ == "__main__":
    main_naming_unknown_keys(main, __file__, "train")
