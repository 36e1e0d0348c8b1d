"""Grouped-prompt, length-aware, rank-sharded batch sampler.

- A batch is a list of whole groups, so all comparisons of a prompt share a batch (eq 6).
- Batches are filled by a budget, not a fixed count: at most ``max_tokens`` tokens the backbone
  processes (padded: rows x longest row; with ``tokens`` given, the packed layouts' count: the sum of
  each group's ``tokens``), ``max_responses`` rows and ``max_groups`` groups.
- Groups are shuffled, cut into pools of ``pool_size`` batches' worth, and sorted by length inside a
  pool, so a batch holds similar lengths (little padding) while the order stays random.
- It shards itself across DDP ranks: batch b goes to rank ``b % world_size``. Ranks see disjoint
  groups. For training (``even=True``) every rank must run the same number of steps, so when the batch
  count does not divide by the world size, batches holding more than one group are split in two (the
  largest first, by padded tokens; a part of a batch always fits the budgets) until it does. Nothing is
  dropped and nothing repeated (``DistributedSampler`` repeats, which gives two ranks the same groups).
  Only when that is impossible (every batch a single group and the count still indivisible) are the
  fewest groups left out; that count is ``coverage()['left_out']``, warned about each epoch and written
  to the data report by the data module. With fewer groups than ranks (a toy set) groups are repeated
  instead, counted as ``coverage()['repeated']``. For evaluation (``even=False``) nothing is split,
  dropped or repeated: every group is scored once.
- ``max_comparisons`` caps the comparisons in a batch (a group is never cut): the data module sets it
  from ``data.global_batch_comparisons`` divided across ranks and accumulation steps.
- ``set_epoch(e)`` reshuffles; ``state_dict``/``load_state_dict`` carry the position for exact resume.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)


class GroupBatchSampler:
    def __init__(
        self,
        rows: Sequence[int],
        row_len: Sequence[int],
        max_tokens: int = 16384,
        max_responses: int = 64,
        max_groups: int | None = None,
        shuffle: bool = True,
        sort_by_length: bool = True,
        pool_size: int = 50,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        even: bool = True,
        comparisons: Sequence[int] | None = None,
        max_comparisons: int | None = None,
        tokens: Sequence[int] | None = None,
    ):
        if len(rows) != len(row_len):
            raise ValueError("rows and row_len must have one entry per group")
        self.rows, self.row_len = list(rows), list(row_len)
        self.max_tokens, self.max_responses, self.max_groups = max_tokens, max_responses, max_groups
        self.shuffle, self.sort_by_length, self.pool_size = shuffle, sort_by_length, pool_size
        self.seed, self.num_replicas, self.rank, self.even = seed, num_replicas, rank, even
        self.comparisons = list(comparisons) if comparisons is not None else [0] * len(self.rows)
        self.max_comparisons = max_comparisons
        # Packed forwards (rmlab.data.layout): a group costs its own tokens, with no padding to the longest row.
        self.tokens = list(tokens) if tokens is not None else None
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches consumed), set by load_state_dict
        if max_comparisons is not None:
            too_big = [i for i, c in enumerate(self.comparisons) if c > max_comparisons]
            if too_big:
                raise ValueError(
                    f"group {too_big[0]} has {self.comparisons[too_big[0]]} comparisons, more than the per-rank "
                    f"batch of {max_comparisons} (data.global_batch_comparisons / (ranks x accumulate_grad_batches)); "
                    "a group is never cut, so raise data.global_batch_comparisons"
                )
        for i, (k, n) in enumerate(zip(self.rows, self.row_len)):
            if k > max_responses or (k * n if self.tokens is None else self.tokens[i]) > max_tokens:
                raise ValueError(
                    f"group {i} has {k} responses of up to {n} tokens, more than one batch holds "
                    f"(max_responses={max_responses}, max_tokens={max_tokens}); split it first "
                    "(the data module does) or raise data.max_tokens"
                )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _fits(self, n_rows: int, longest: int, n_groups: int, n_cmp: int = 0, n_tok: int = 0) -> bool:
        if self.max_groups is not None and n_groups > self.max_groups:
            return False
        if self.max_comparisons is not None and n_cmp > self.max_comparisons:
            return False
        cost = n_rows * longest if self.tokens is None else n_tok
        return n_rows <= self.max_responses and cost <= self.max_tokens

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 100003 + self.epoch)
        order = list(range(len(self.rows)))
        if self.shuffle:
            rng.shuffle(order)
        if self.sort_by_length:
            per_batch = max(1, self.max_tokens // max(1, max(self.row_len, default=1) * 2))
            pool = max(1, self.pool_size * per_batch)
            order = [
                i
                for s in range(0, len(order), pool)
                for i in sorted(order[s : s + pool], key=lambda j: self.row_len[j])
            ]
        toks = self.tokens or [0] * len(self.rows)
        batches, cur, n_rows, longest, n_cmp, n_tok = [], [], 0, 0, 0, 0
        for i in order:
            nr, nl, nc = n_rows + self.rows[i], max(longest, self.row_len[i]), n_cmp + self.comparisons[i]
            nt = n_tok + toks[i]
            if cur and not self._fits(nr, nl, len(cur) + 1, nc, nt):
                batches.append(cur)
                cur, nr, nl, nc, nt = [], self.rows[i], self.row_len[i], self.comparisons[i], toks[i]
            cur.append(i)
            n_rows, longest, n_cmp, n_tok = nr, nl, nc, nt
        if cur:
            batches.append(cur)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _cost(self, batch: list[int]) -> int:
        """Tokens of a batch: rows x longest row, or the packed count."""
        if self.tokens is not None:
            return sum(self.tokens[i] for i in batch)
        return sum(self.rows[i] for i in batch) * max(self.row_len[i] for i in batch)

    def _halve(self, batch: list[int]) -> tuple[list[int], list[int]]:
        """Cut a batch of >= 2 groups in two, at the group boundary closest to half of its rows."""
        total, acc, best, cut = sum(self.rows[i] for i in batch), 0, None, 1
        for j in range(1, len(batch)):
            acc += self.rows[batch[j - 1]]
            if best is None or abs(2 * acc - total) < best:
                best, cut = abs(2 * acc - total), j
        return batch[:cut], batch[cut:]

    def _even_batches(self) -> tuple[list[list[int]], dict[str, int]]:
        """All batches of this epoch, made to divide by the world size (training), and what that cost.

        Returns the batches and ``{"split": batches split in two, "left_out": groups not in any batch,
        "repeated": groups given to a second rank}``. Only ``split`` is nonzero unless splitting cannot
        reach a multiple of the world size (see the module docstring).
        """
        batches = self._all_batches()
        w = self.num_replicas
        info = {"split": 0, "left_out": 0, "repeated": 0}
        if not (self.even and w > 1 and len(batches) % w):
            return batches, info
        n_groups = sum(len(b) for b in batches)
        target = -(-len(batches) // w) * w  # the next multiple of the world size
        if target <= n_groups or n_groups < w:
            # Splitting a batch of several groups adds one batch and never breaks a budget.
            while len(batches) < min(target, n_groups):
                i = max((j for j, b in enumerate(batches) if len(b) > 1), key=lambda j: (self._cost(batches[j]), -j))
                batches[i : i + 1] = list(self._halve(batches[i]))
                info["split"] += 1
        if len(batches) % w == 0:
            return batches, info
        if len(batches) < w:
            # Fewer groups than ranks (a toy dataset): repeat rather than hang a rank.
            info["repeated"] = sum(len(b) for b in (batches * w)[len(batches) : w])
            return (batches * w)[:w], info
        # Every batch would have to be a single group and the count still would not divide: leave out the
        # batches with the fewest groups (counted, warned about, and in the data report).
        extra = len(batches) % w
        out = set(sorted(range(len(batches)), key=lambda j: (len(batches[j]), -j))[:extra])
        info["left_out"] = sum(len(batches[j]) for j in out)
        return [b for j, b in enumerate(batches) if j not in out], info

    def coverage(self, epoch: int | None = None) -> dict[str, int]:
        """What evening out the ranks cost in an epoch (this one by default): split, left_out, repeated."""
        saved = self.epoch
        self.epoch = saved if epoch is None else epoch
        try:
            return self._even_batches()[1]
        finally:
            self.epoch = saved

    def _my_batches(self, warn: bool = False) -> list[list[int]]:
        batches, info = self._even_batches()
        if warn and (info["left_out"] or info["repeated"]) and self.rank == 0:
            log.warning(
                "epoch %d: %d batches cannot be shared evenly by %d ranks without splitting a group: %d group(s) "
                "left out, %d repeated this epoch (lower data.max_tokens/data.max_responses to batch more finely)",
                self.epoch,
                len(batches),
                self.num_replicas,
                info["left_out"],
                info["repeated"],
            )
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._my_batches(warn=True)
        skip = 0
        if self._resume is not None:
            # Skip only in the epoch the checkpoint was taken in: Lightning calls set_epoch after
            # load_state_dict, and a checkpoint from an epoch's end resumes in the next epoch.
            epoch, consumed = self._resume
            skip = consumed if epoch == self.epoch else 0
            self._resume = None
            if skip >= len(mine) > 0:  # the checkpoint closed its epoch: go on with the next one
                self.epoch += 1
                mine, skip = self._my_batches(warn=True), 0
        yield from mine[skip:]

    def __len__(self) -> int:
        return len(self._my_batches())

    def state_dict(self, consumed: int) -> dict:
        return {"epoch": self.epoch, "consumed": consumed, "seed": self.seed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        if (
            state.get("seed", self.seed) != self.seed
            or state.get("num_replicas", self.num_replicas) != self.num_replicas
        ):
            # Another seed or world size orders the batches differently: skipping by count would be wrong.
            raise ValueError(
                f"the checkpoint's sampler ran with seed={state.get('seed')} on {state.get('num_replicas')} ranks; "
                f"this run has seed={self.seed} on {self.num_replicas}. Resume with the same seed and devices."
            )
        self.epoch = state["epoch"]
        self._resume = (state["epoch"], state["consumed"])
