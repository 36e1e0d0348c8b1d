"""RewardDataModule: records -> groups -> tokenized groups -> grouped, length-aware batches.

Splits are by prompt: a prompt (exact text) is in train or in val, never both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from rmlab.data.chat import DEFAULT_FALLBACK_TEMPLATE
from rmlab.data.collate import Collator
from rmlab.data.formats import records_to_groups
from rmlab.data.layout import LayoutSpec
from rmlab.data.loader import ResumableLoader
from rmlab.data.sampler import GroupBatchSampler
from rmlab.data.simulator import SimulatorConfig, generate, spurious_feature_report
from rmlab.data.sources import DataError, read_records, resolve_paths
from rmlab.data.tokenize import (
    TokenizedGroup,
    cache_key,
    contract,
    explode_pairs,
    load_cached,
    save_cached,
    split_group,
    tokenize_groups,
)
from rmlab.data.types import DataReport, PreferenceGroup

log = logging.getLogger(__name__)
# Drop reasons of a source that could not be opened at all (rmlab/data/sources.py): under data.on_error=skip they are
# counted like bad records, but when they are all there is, the path is wrong, and the error says so.
UNREADABLE_SOURCE = ("file not found", "no file matches the pattern", "the folder has no data files")


def source_files_stamp(source: str | list | tuple) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every local file a source resolves to; [] for a hub name or the simulator."""
    if isinstance(source, (list, tuple)):
        return [x for one in source for x in source_files_stamp(one)]
    out = []
    for path in resolve_paths(os.path.expanduser(str(source))):
        try:
            st = os.stat(path)
        except OSError:  # gone between listing and stat: reading it will report that
            continue
        out.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
    return out


def data_code_version() -> str:
    """A hash of the source text of the rmlab.data modules: a code change invalidates the cache."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\x00" + path.read_bytes())
    return h.hexdigest()[:16]


def packed_tokens(g: TokenizedGroup, mode: str) -> int:
    """Tokens a group puts in a packed row: its prompt once (prefix_shared, and auto, which picks packed
    only where that is cheaper) or once per response (packed)."""
    p = len(g.prompt_ids)
    return sum(len(r) for r in g.response_ids) + (p * g.k if mode == "packed" else p)


def in_val(prompt: str, fraction: float, seed: int) -> bool:
    # surrogatepass: a lone surrogate (refused by the readers, but possible in records built in code)
    # hashes like any other text instead of raising; valid text hashes exactly as with plain utf-8.
    h = int(hashlib.sha1(f"{seed}\x00{prompt}".encode("utf-8", "surrogatepass")).hexdigest()[:8], 16)
    return (h % 100_000) < fraction * 100_000


def baselines(groups: list[TokenizedGroup]) -> dict[str, float]:
    """Accuracy of reference predictors on non-tie comparisons.

    length_acc: "the longer response wins" (equal lengths score 0.5): length alone.
    oracle_acc: the simulator's true reward (Bayes-optimal on its noisy labels); NaN on real data.
    """
    n = length = oracle = 0.0
    has_truth = True
    for g in groups:
        for w, lo, t in zip(g.winner, g.loser, g.tie):
            if t:
                continue
            n += 1
            lw, ll = len(g.response_ids[w]), len(g.response_ids[lo])
            length += 1.0 if lw > ll else 0.5 if lw == ll else 0.0
            tw, tl = g.true_rewards[w], g.true_rewards[lo]
            if math.isnan(tw) or math.isnan(tl):
                has_truth = False
            else:
                oracle += 1.0 if tw > tl else 0.5 if tw == tl else 0.0
    if n == 0:
        return {"length_acc": float("nan"), "oracle_acc": float("nan")}
    return {"length_acc": length / n, "oracle_acc": oracle / n if has_truth else float("nan")}


@dataclass
class RecordsConfig:
    """Which records are read, how they become preference groups, and which prompts are held out."""

    name: str = "data"  # label in the data report
    source: str = "simulator"  # `simulator`, a local file/dir/glob, or a hub dataset name
    format: str = "pairs"  # the format adapter (rmlab.data.formats)
    fields: dict = field(default_factory=dict)  # the format's field names -> the file's own
    split: str = "train"  # the source's split (hub datasets)
    val_source: str | None = None  # a separate val source; None = hold out val_fraction of the prompts
    val_split: str | None = None  # a separate val split of the source
    val_fraction: float = 0.1  # share of prompts held out (split by prompt text)
    simulator: dict = field(default_factory=dict)  # the simulator's settings (source=simulator)
    max_records: int | None = None  # read at most this many records
    on_error: str = "raise"  # raise | skip: what a bad record does
    hub_kwargs: dict = field(default_factory=dict)  # passed to datasets.load_dataset (e.g. data_dir)
    format_options: dict = field(default_factory=dict)  # the format adapter's own options
    seed: int = 0  # the split and the simulator follow it
    max_train_prompts: int | None = None  # cap on labelled training prompts (learning curves)


@dataclass
class RowsConfig:
    """How a group becomes token rows: truncation, and whether comparisons stay grouped."""

    max_length: int = 512  # tokens per row (prompt + response); the prompt is cut first
    min_prompt_tokens: int = 16  # the prompt keeps at least this many tokens when cut
    reward_token: str = "auto"  # causal LMs: auto | eos | last (rmlab.data.tokenize, the scoring contract)
    pair_batching: str = "grouped"  # grouped (eq 6) | shuffled (one sample per comparison)


@dataclass
class BatchesConfig:
    """How tokenized groups are batched (max_tokens and max_responses also split groups too big for a batch)."""

    max_tokens: int = 8192  # tokens per batch, counted as ``budget`` says
    # What max_tokens counts: padded = rows x longest row (every mode); packed = the tokens of the packed row the
    # packed forwards run over (each prompt once under prefix sharing); padded mode counts padded either way.
    budget: str = "padded"
    max_responses: int = 64  # rows per batch at most
    max_groups: int | None = None  # prompts per batch at most
    sort_by_length: bool = True  # batch similar lengths together
    padding_side: str = "right"  # right | left; rewards do not depend on it
    num_workers: int = 0  # DataLoader workers (they also build the packed layout)
    pin_memory: bool | None = None  # page-locked batches for non_blocking copies; None = when CUDA is available
    global_batch_comparisons: int | None = None  # comparisons per optimizer step over all ranks (a cap)


CONFIGS = {"records": RecordsConfig, "rows": RowsConfig, "batches": BatchesConfig}
# Batch settings that also shape the tokenized groups (a group bigger than a batch is split), so they key the cache.
BATCH_KEYS_IN_CACHE = ("max_tokens", "max_responses")


def build_datamodule(
    tokenizer: Any = None,
    template: Any = None,
    output_dir: str | None = None,
    cache: bool = True,
    layout: LayoutSpec | None = None,
    **options: Any,
) -> RewardDataModule:
    """The ``_target_`` of conf/data/*.yaml: the flat ``data.*`` keys sorted into the three configs. A key that
    none of them has is an error that lists the valid ones."""
    parts: dict[str, dict[str, Any]] = {k: {} for k in CONFIGS}
    owner = {f.name: part for part, cls in CONFIGS.items() for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in options if k not in owner)
    if unknown:
        raise ValueError(
            f"unknown data option(s) {', '.join('data.' + k for k in unknown)}; valid keys: "
            f"{', '.join(sorted([*owner, 'cache']))}"
        )
    for k, v in options.items():
        parts[owner[k]][k] = {} if v is None and k in ("fields", "simulator", "hub_kwargs", "format_options") else v
    return RewardDataModule(
        tokenizer=tokenizer,
        records=RecordsConfig(**parts["records"]),
        rows=RowsConfig(**parts["rows"]),
        batches=BatchesConfig(**parts["batches"]),
        template=template,
        output_dir=output_dir,
        cache=cache,
        layout=layout,
    )


class RewardDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: Any = None,
        records: RecordsConfig | None = None,
        rows: RowsConfig | None = None,
        batches: BatchesConfig | None = None,
        template: Any = None,
        output_dir: str | None = None,
        cache: bool = True,
        layout: LayoutSpec | None = None,
    ):
        """``template``: a generative model's row builder (rmlab.data.templates.GroupTemplate), applied after the
        split. ``cache``: keep tokenized groups in $RMLAB_CACHE (~/.cache/rmlab), keyed by ``_cache_key``."""
        super().__init__()
        self.tokenizer = tokenizer
        self.records, self.rows, self.batches = records or RecordsConfig(), rows or RowsConfig(), batches or BatchesConfig()
        self.template, self.output_dir, self.cache = template, output_dir, cache
        # The model's packed layout (RewardModel.batch_layout): the collator builds it, and the token budget
        # counts the tokens that layout forwards instead of padded rows.
        self.layout = layout
        self.train_groups: list[TokenizedGroup] | None = None
        self.val_groups: list[TokenizedGroup] = []
        self.report: dict[str, Any] = {}

    # ----------------------------------------------------------------- loading
    def load_groups(self, source: str, split: str, report: DataReport) -> list[PreferenceGroup]:
        if source == "simulator":
            sim = SimulatorConfig(**{**self.records.simulator, "seed": self.records.simulator.get("seed", self.records.seed)})
            groups = generate(sim)
            report.loaded = report.kept = len(groups)
            return groups
        records = read_records(source, split, self.records.hub_kwargs)
        # The chat format renders messages with the tokenizer's own chat template.
        options = {**self.records.format_options, "tokenizer": self.tokenizer} if self.records.format == "chat" else self.records.format_options
        return records_to_groups(records, self.records.format, self.records.fields, report, self.records.on_error, self.records.max_records, **options)

    def _tokenize(self, groups: list[PreferenceGroup], report: DataReport) -> list[TokenizedGroup]:
        if self.template is not None:
            templated = [self.template(g) for g in groups]
            for g, t in zip(groups, templated):
                if t is None:  # e.g. a pairwise judge cannot use a group without comparisons
                    report.drop("rejected_by_model_template", g.n_records)
                    report.kept -= g.n_records
            groups = [t for t in templated if t is not None]
        else:  # critiques are read only by a reasoning model's template (rmlab.models.reasoning)
            groups = [dataclasses.replace(g, critiques=None) if g.critiques is not None else g for g in groups]
        toks = tokenize_groups(
            groups, self.tokenizer, report, self.rows.max_length, self.rows.min_prompt_tokens, self.rows.reward_token
        )
        # A group bigger than one batch is split into sub-groups (documented in split_group).
        row_cap = max(2, min(self.batches.max_responses, self.batches.max_tokens // max(1, max((t.max_row for t in toks), default=1))))
        out = []
        for i, t in enumerate(toks):
            subs = split_group(t, row_cap, parent=i) if t.k > row_cap or t.k * t.max_row > self.batches.max_tokens else [t]
            if len(subs) > 1:
                report.truncated["groups_split_into_subgroups"] += 1
            if not subs:  # splitting keeps comparisons; a comparison-less group too big for a batch cannot be kept
                report.drop("pointwise_group_larger_than_a_batch", t.n_records)
                report.kept -= t.n_records
            out.extend(subs)
        if self.rows.pair_batching == "shuffled":
            for t in out:
                if not t.winner:  # shuffled batching is made of comparisons; pointwise-only groups have none
                    report.drop("no_comparison_for_shuffled_batching", t.n_records)
                    report.kept -= t.n_records
            out = [p for t in out for p in explode_pairs(t)]
        elif self.rows.pair_batching != "grouped":
            raise ValueError(f"data.pair_batching must be grouped|shuffled, got {self.rows.pair_batching!r}")
        return out

    def _build(self) -> tuple[list[TokenizedGroup], list[TokenizedGroup], dict]:
        train_r, val_r = DataReport(name=f"{self.records.name}/train"), DataReport(name=f"{self.records.name}/val")
        groups = self.load_groups(self.records.source, self.records.split, train_r)
        if self.records.val_source or self.records.val_split:
            train = groups
            val = self.load_groups(self.records.val_source or self.records.source, self.records.val_split or self.records.split, val_r)
            train_prompts = {g.prompt for g in train}
            leaked = [g for g in val if g.prompt in train_prompts]
            if leaked:  # a prompt in both splits would inflate val accuracy; keep it in train only
                val = [g for g in val if g.prompt not in train_prompts]
                n = sum(g.n_records for g in leaked)
                val_r.drop("prompt_also_in_train", n)
                val_r.kept -= n
        else:
            val_mask = [in_val(g.prompt, self.records.val_fraction, self.records.seed) for g in groups]
            train = [g for g, v in zip(groups, val_mask) if not v]
            val = [g for g, v in zip(groups, val_mask) if v]
            # One source, two splits: move the val share of the counts over so each report balances.
            nv = sum(g.n_records for g in val)
            val_r.loaded = val_r.kept = nv
            train_r.loaded -= nv
            train_r.kept -= nv
        if self.records.max_train_prompts is not None and len(train) > self.records.max_train_prompts:
            # A learning-curve knob: fewer labelled prompts, the same val set. The rest are counted.
            cut = train[self.records.max_train_prompts :]
            train = train[: self.records.max_train_prompts]
            n = sum(g.n_records for g in cut)
            train_r.drop("beyond_max_train_prompts", n)
            train_r.kept -= n
        train_t, val_t = self._tokenize(train, train_r), self._tokenize(val, val_r)
        for r, toks in ((train_r, train_t), (val_r, val_t)):
            ks = [t.k for t in toks]
            rows = [len(t.prompt_ids) + len(x) for t in toks for x in t.response_ids]
            r.extra.update(
                groups=len(toks),
                k_per_prompt={"min": min(ks, default=0), "max": max(ks, default=0), "mean": sum(ks) / max(1, len(ks))},
                tokens_per_row={
                    "min": min(rows, default=0),
                    "max": max(rows, default=0),
                    "mean": sum(rows) / max(1, len(rows)),
                },
            )
        report = {"train": train_r.to_dict(), "val": val_r.to_dict(), "val_baselines": baselines(val_t)}
        if self.records.source == "simulator" and float(self.records.simulator.get("hack_rate", 0.0)) > 0:
            # The hackable simulator: how strongly its spurious feature drives the labels and the true reward.
            sim = self.records.simulator
            report["spurious_feature"] = {
                "hack_rate": sim["hack_rate"],
                "hack_strength": sim.get("hack_strength", SimulatorConfig.hack_strength),
                "train": spurious_feature_report(train),
                "val": spurious_feature_report(val),
            }
        report["one_line"] = [train_r.one_line(), val_r.one_line()]
        return train_t, val_t, report

    def _cache_key(self) -> str:
        """Derived from everything that shapes the tokenized groups: every records and rows setting, the batch
        budgets that split groups (``BATCH_KEYS_IN_CACHE``), the model's template, the tokenizer, the files' identity (a rewritten file has another size or mtime) and the data code's
        version, so a cache never outlives the data, the settings or the code that built it."""
        tok = self.tokenizer
        tok_id = (
            type(tok).__name__,
            getattr(tok, "name_or_path", ""),
            len(tok),
            tok.cls_token_id,
            tok.bos_token_id,
            tok.eos_token_id,
            getattr(tok, "chat_template", None),
        )
        files = [source_files_stamp(s) for s in (self.records.source, self.records.val_source) if s]
        batches = {k: getattr(self.batches, k) for k in BATCH_KEYS_IN_CACHE}
        shaping = {"records": dataclasses.asdict(self.records), "rows": dataclasses.asdict(self.rows), "batches": batches}
        return cache_key("v3", files, data_code_version(), tok_id, shaping, repr(self.template))

    def setup(self, stage: str | None = None) -> None:
        if self.train_groups is not None:
            return
        if self.tokenizer is None:
            raise ValueError("RewardDataModule needs a tokenizer (run() passes the model's)")
        key = self._cache_key() if self.cache else None
        hit = load_cached(key) if key else None
        if hit is not None:
            groups, self.report = hit
            n_train = self.report["n_train_groups"]
            self.train_groups, self.val_groups = groups[:n_train], groups[n_train:]
        else:
            self.train_groups, self.val_groups, self.report = self._build()
            self.report["n_train_groups"] = len(self.train_groups)
            if key:
                save_cached(key, self.train_groups + self.val_groups, self.report)
        for line in self.report["one_line"]:
            log.info(line)
        self.write_report()  # also when nothing is left: the report says why
        separate = self.records.val_source or self.records.val_split
        if self.train_groups and not self.val_groups and (separate or self.records.val_fraction > 0):
            # Validation was asked for but nothing is there (a few prompts, split by a hash of their text):
            # val/acc would be NaN with no word why.
            held = "the separate validation data" if separate else (
                f"data.val_fraction={self.records.val_fraction} of {len(self.train_groups)} prompts")
            log.warning("[%s] no validation groups: %s held out none, so val/acc and val/loss will be missing (NaN "
                        "in metrics.json). Use more data, a larger data.val_fraction, or data.val_source=<file> "
                        "(data report: %s)", self.records.name, held,
                        Path(self.output_dir) / "data_report.json" if self.output_dir else "the log above")
        if not self.train_groups:
            records = self.report.get("train", {}).get("records", {})
            unread = {k: n for k, n in records.get("dropped", {}).items()
                      if k.removeprefix("bad_record: ").startswith(UNREADABLE_SOURCE)}
            if unread and sum(unread.values()) == records.get("loaded"):  # not one record read: a wrong path
                raise DataError(f"data.source={self.records.source}",
                                f"{next(iter(unread)).removeprefix('bad_record: ')}: nothing was read, so no training "
                                "groups left (data.on_error=skip counts bad records; it cannot make up for a missing "
                                "source)",
                                missing_source_hint(str(self.records.source)))
            where = Path(self.output_dir) / "data_report.json" if self.output_dir else "the log above"
            raise DataError(f"data.source={self.records.source}", "no training groups left after loading, splitting and "
                            "tokenizing", f"read the data report at {where}; " + " ".join(self.report["one_line"]))

    def write_report(self) -> None:
        if not self.output_dir:
            return
        is_zero = self.trainer is None or self.trainer.is_global_zero
        if is_zero:
            out = Path(self.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "data_report.json").write_text(json.dumps(self.report, indent=2, default=str))

    # ------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        t = self.trainer
        if t is None:
            return 1, 0
        return t.world_size, t.global_rank

    def per_rank_comparisons(self) -> int | None:
        """The comparison cap of one micro-batch: the global batch divided across ranks and accumulation."""
        if self.batches.global_batch_comparisons is None:
            return None
        world, _ = self._world()
        accum = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1) if self.trainer is not None else 1
        parts = world * accum
        if self.batches.global_batch_comparisons <= 0 or self.batches.global_batch_comparisons % parts:
            raise ValueError(
                f"data.global_batch_comparisons={self.batches.global_batch_comparisons} does not divide across {world} ranks x "
                f"{accum} accumulation steps; use a positive multiple of {parts}"
            )
        return self.batches.global_batch_comparisons // parts

    def packed_budget(self) -> bool:
        """Whether max_tokens counts packed tokens: ``budget=packed`` and a model that packs (a layout)."""
        if self.batches.budget not in ("padded", "packed"):
            raise ValueError(f"data.budget must be padded|packed, got {self.batches.budget!r}")
        return self.batches.budget == "packed" and self.layout is not None

    def make_sampler(self, groups: list[TokenizedGroup], train: bool, single: bool = False) -> GroupBatchSampler:
        world, rank = (1, 0) if single else self._world()
        return GroupBatchSampler(
            rows=[g.k for g in groups],
            row_len=[g.max_row for g in groups],
            max_tokens=self.batches.max_tokens,
            max_responses=self.batches.max_responses,
            max_groups=self.batches.max_groups,
            shuffle=train,
            sort_by_length=self.batches.sort_by_length,
            seed=self.records.seed,
            num_replicas=world,
            rank=rank,
            even=train,
            comparisons=[len(g.winner) for g in groups],
            max_comparisons=self.batches.global_batch_comparisons if single else self.per_rank_comparisons(),
            tokens=[packed_tokens(g, self.layout.mode) for g in groups] if self.packed_budget() else None,
        )

    def _loader(self, groups: list[TokenizedGroup], train: bool, single: bool = False) -> DataLoader:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # The training loader is stateful: its sampler position goes into checkpoints (rmlab.checkpoint).
        cls, extra = (ResumableLoader, {"trainer": self.trainer}) if train and self.trainer else (DataLoader, {})
        return cls(
            groups,
            batch_sampler=self.make_sampler(groups, train, single),
            collate_fn=Collator(pad, self.batches.padding_side, self.layout),
            num_workers=self.batches.num_workers,
            pin_memory=torch.cuda.is_available() if self.batches.pin_memory is None else self.batches.pin_memory,
            persistent_workers=self.batches.num_workers > 0,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_groups, train=True)
        self._note_sharding(loader.batch_sampler)
        return loader

    def _note_sharding(self, sampler: GroupBatchSampler) -> None:
        """Put what sharding the training batches across ranks cost into the data report.

        The sampler splits batches so every rank runs the same steps without losing a group; only when
        that is impossible does it leave groups out (or, with fewer groups than ranks, repeat them). Those
        counts (for the first epoch; the sampler warns in every epoch that has any) go to the report.
        """
        if sampler.num_replicas <= 1 or "train" not in self.report:
            return
        info = sampler.coverage()
        self.report["train"]["sharding"] = {
            "ranks": sampler.num_replicas,
            "epoch": sampler.epoch,
            "batches_split": info["split"],
            "groups_left_out": info["left_out"],
            "groups_repeated": info["repeated"],
        }
        if info["left_out"] or info["repeated"]:
            log.warning(
                "[%s/train] %d group(s) left out and %d repeated per epoch to give %d ranks equal steps (data report: "
                "train.sharding)",
                self.records.name,
                info["left_out"],
                info["repeated"],
                sampler.num_replicas,
            )
        self.write_report()

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_groups, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_groups, train=False)

    def scoring_meta(self) -> dict:
        """How this data's rows were built (the scoring contract), for the export's ``config.rmlab.scoring``;
        ``chat_template`` is the template chat data was rendered with when the tokenizer has none of its own."""
        meta = {
            "format": self.records.format,
            "max_length": self.rows.max_length,
            "min_prompt_tokens": self.rows.min_prompt_tokens,
            **contract(self.tokenizer, self.rows.reward_token),
        }
        if self.records.format == "chat" and not getattr(self.tokenizer, "chat_template", None):
            meta["chat_template"] = self.records.format_options.get("fallback_template", DEFAULT_FALLBACK_TEMPLATE)
        return meta

    def eval_loader(self, groups: list[TokenizedGroup] | None = None) -> DataLoader:
        """The given groups (default: the val set) in one process, whatever the trainer's ranks: for scoring
        outside the fit loop (eval.py, the export's reward statistics, the head report)."""
        return self._loader(self.val_groups if groups is None else groups, train=False, single=True)


def missing_source_hint(source: str) -> str:
    """What to do when not one record of ``data.source`` could be read: the shared real sets' location for theirs,
    the working directory for a user's own relative path."""
    data_dir = os.environ.get("RMLAB_DATA_DIR")
    if "shared/data" in source or (data_dir and source.startswith(data_dir)):
        return ("check data.source and paths.data_dir: the real sets are read from ../shared/data beside the "
                "directory you ran the command in (run it from the repo root, or set RMLAB_DATA_DIR=<the data folder>)")
    return (f"check data.source: a relative path is read from the directory you ran the command in ({os.getcwd()}); "
            "give an absolute path, or run the command from the folder the path starts in")
