"""The training DataLoader that carries the grouped batch sampler's position through checkpoints.

It lives in the data package (not ``rmlab.checkpoint``) so that building loaders needs nothing from the
checkpoint machinery; ``rmlab.checkpoint.ResumeState`` talks to it only through ``state_dict`` /
``load_state_dict``, Lightning's stateful protocol.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """The training DataLoader: stateful for Lightning (``state_dict``/``load_state_dict``), and the one
    that sets the batch sampler's epoch.

    - The position is read from the trainer's batch progress, not counted in the sampler: the sampler may
      have yielded a batch more than was trained on (a prefetch), the trainer counts what was finished.
    - Lightning's ``set_epoch`` reaches only ``loader.sampler`` and ``loader.batch_sampler.sampler``, never a
      custom batch sampler, so without this every epoch would repeat epoch 0's order.
    - Lightning does not always hand a checkpoint's loader state back (it skips it when the loader was built
      before the checkpoint was restored, which happens whenever ``max_epochs`` is finite: the LR schedule asks
      for ``estimated_stepping_batches``). ``rmlab.checkpoint.ResumeState`` applies it at ``on_train_start``;
      loading the same state twice is harmless, since it takes effect when the sampler's iteration begins.
    """

    def __init__(self, *args: Any, trainer: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._trainer = trainer

    def __iter__(self):
        if self._trainer is not None and hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self._trainer.current_epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        consumed = batches_done(self._trainer) if self._trainer is not None else 0
        return self.batch_sampler.state_dict(consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)


def batches_done(trainer: Any) -> int:
    """Training batches finished in the current epoch (including the one whose end hooks are running)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
