"""What every benchmark shares: reading its rows, one scored item per prompt, the scoring call, the result.

A benchmark is three steps, and only the last one differs between benchmarks:

1. rows -> ``Item``s: one prompt and the K responses the benchmark compares (chosen first);
2. ``score_items``: every conversation (the prompt, then one assistant response) through
   ``rmlab.score.Scorer.score_chat``, the scoring path of ``rmlab.score`` and ``eval.py`` (no forward loop of its own);
3. the benchmark's own rules over the per-response rewards -> a ``BenchResult``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmlab.data.sources import DataError, read_records, resolve_paths

NAN = float("nan")
Messages = list[dict[str, str]]


# --------------------------------------------------------------------------- rows
def read_rows(source: str, split: str | None, name: str) -> Iterator[tuple[str, dict]]:
    """``(location, row)`` of a benchmark from a hub name or a local copy.

    - a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``: ``datasets.load_from_disk``
      (checked first: its state.json / dataset_dict.json are not rows);
    - a file (.json list, .jsonl, .parquet, .csv, optionally .gz): every row (a file holds one split);
    - a folder with data files in it: every row of every file (sorted by name);
    - a folder in the hub's layout (README.md, ``data/<split>-00000-of-00001.parquet``: a downloaded snapshot):
      read with ``datasets.load_dataset`` exactly as the hub name would be (prepared afresh, never from the cache);
    - anything else is a hub name: ``datasets.load_dataset(source, split=split)``.
    ``split=None`` reads every split of a hub dataset and sets the row's ``subset`` to its split's name, its own
    ``subset`` kept as ``subsubset`` (RewardBench's prior sets are one split per subset).
    """
    local = Path(os.path.expanduser(source))
    if _saved_to_disk(local):  # before the file check: such a folder holds .json files that are not rows
        yield from _read_datasets(str(local), split, name)
        return
    if resolve_paths(str(local)):
        for where, rec in read_records(str(local)):
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict):  # every loader reads named fields of a row
                raise DataError(where, f"a row must be an object, got {type(rec).__name__}",
                                "each row of a benchmark file is a JSON object with the benchmark's fields")
            yield where, rec
        return
    if local.exists() and not local.is_dir():
        raise DataError(str(local), "not a data file", "give a .json, .jsonl, .parquet or .csv file, or a hub name")
    yield from _read_datasets(source if not local.is_dir() else str(local), split, name)


def _saved_to_disk(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (state.json) or ``DatasetDict.save_to_disk`` (dataset_dict.json)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _read_datasets(source: str, split: str | None, name: str) -> Iterator[tuple[str, dict]]:
    import datasets  # slow to import; only hub names and hub-layout folders need it

    try:
        if _saved_to_disk(Path(source)):
            ds = datasets.load_from_disk(source)
            if split is not None and isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source}[{split}]", f"the saved DatasetDict has no split {split!r} (it has "
                                    f"{', '.join(ds)})", "set benchmark.split to one of them")
                ds = ds[split]
        elif Path(source).is_dir():
            # A local folder in the hub's layout: prepared afresh each time. datasets keys its cache of a local folder
            # by the folder's name and its README's configs, not by the files, so a second copy with the same name
            # (another revision, or edited files) would be served the first one's rows.
            ds = datasets.load_dataset(source, split=split, download_mode="force_redownload")
        else:
            ds = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{source}[{split or 'all splits'}]",
            f"could not load the {name} data ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
            "check benchmark.source and benchmark.split, your network or HF_HUB_OFFLINE; or point benchmark.source at a "
            "local copy (a file, or a folder in the hub's layout)",
        ) from None
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [(split, ds)]
    for part, d in parts:
        for n, rec in enumerate(d):
            if split is None:  # as the official loader: the split names the subset, a row's own moves aside
                rec = {**rec, "subset": part, "subsubset": rec.get("subset")}
            yield f"{source}[{part}]:{n}", rec


def need(rec: dict, where: str, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``rec[key]`` when it is a ``kind``, else a DataError naming the row and the field."""
    v = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        got = "missing" if not isinstance(rec, dict) or key not in rec else f"a {type(v).__name__}"
        present = ", ".join(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__
        raise DataError(where, f"field {key!r} must be {what}, got {got}", f"the row has: {present}; is it this benchmark's file?")
    return v


def text_list(rec: dict, where: str, key: str, n: int | None = None) -> list[str]:
    v = need(rec, where, key, (list, tuple), "a list of response texts")
    if not all(isinstance(x, str) for x in v) or (n is not None and len(v) != n) or not v:
        raise DataError(where, f"field {key!r} must be a list of {n or 'one or more'} strings, got {len(v)} item(s)",
                        "check the file against the benchmark's published schema (docs/eval.md#benchmarks)")
    return list(v)


# --------------------------------------------------------------------------- items and conversations
@dataclass
class Item:
    """One prompt and the responses a benchmark compares; ``responses[:n_chosen]`` are the chosen (correct) ones."""

    uid: str
    subset: str
    prompt: str | Messages  # text, or the messages before the response (multi-turn prompts)
    responses: list[str]
    n_chosen: int = 1
    gold: list[float] | None = None  # best-of-K: each response's gold score
    where: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def conversations(item: Item) -> list[Messages]:
    """The item's K conversations: its prompt messages plus one assistant response each."""
    head = [{"role": "user", "content": item.prompt}] if isinstance(item.prompt, str) else list(item.prompt)
    return [head + [{"role": "assistant", "content": r}] for r in item.responses]


def score_items(scorer: Any, items: list[Item], chunk: int = 256, progress: bool = True) -> list[list[float]]:
    """Each item's per-response rewards: its conversations through ``rmlab.score.Scorer.score_chat``, so every row is
    exactly ``apply_chat_template(conversation, tokenize=True)`` as in training (rmlab's fallback template for a
    tokenizer without one; docs/eval.md, the scoring contract). Chunks of items, a tqdm bar."""
    from tqdm.auto import tqdm  # progress bars only where long work runs

    out: list[list[float]] = []
    bar = tqdm(total=sum(len(i.responses) for i in items), unit="resp", desc="scoring", disable=not progress)
    for a in range(0, len(items), chunk):
        part = items[a : a + chunk]
        rewards = scorer.score_chat([conversations(it) for it in part], [it.where for it in part])
        for it, rs in zip(part, rewards):
            if len(rs) != len(it.responses) or any(math.isnan(r) for r in rs):
                raise RuntimeError(f"{it.where}: {len(rs)} rewards for {len(it.responses)} responses (a scoring bug)")
        out.extend(rewards)
        bar.update(sum(len(i.responses) for i in items[a : a + chunk]))
    bar.close()
    return out


def first_per_subset(items: list[Item], n: int | None) -> tuple[list[Item], int]:
    """The first ``n`` items of each subset (all when ``n`` is None) and how many were left out."""
    if not n:
        return items, 0
    seen: dict[str, int] = {}
    keep = []
    for it in items:
        seen[it.subset] = seen.get(it.subset, 0) + 1
        if seen[it.subset] <= n:
            keep.append(it)
    return keep, len(items) - len(keep)


# --------------------------------------------------------------------------- results
@dataclass
class BenchResult:
    """A benchmark's numbers as its authors compute them, plus what the report shows.

    ``per_item``: one dict per item: ``uid``, ``subset``, ``section``, ``credit`` (the item's score, in [0, 1]),
    ``margin`` (worst chosen - best rejected reward: below 0 = wrong), ``chosen``/``rejected`` (index of the
    response the report shows on each side)."""

    name: str
    score: float  # the headline: the number the leaderboard shows
    sections: dict[str, float]  # section -> score (RewardBench's Chat..., RB2's subsets, RM-Bench's domains)
    subsets: dict[str, tuple[float, int]]  # subset -> (score, examples)
    section_of: dict[str, str]  # subset -> its section ('' = in no section)
    scalars: dict[str, float] = field(default_factory=dict)  # everything else (hard/normal/easy, Ties parts, ...)
    tables: dict[str, Any] = field(default_factory=dict)
    per_item: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a reader must know (missing sections, dropped rows)

    def flat(self) -> dict[str, float]:
        s = {"score": self.score}
        s.update({f"section/{k}": v for k, v in self.sections.items()})
        s.update({f"subset/{k}": v for k, (v, _) in self.subsets.items()})
        s.update(self.scalars)
        return s


def mean(xs: list[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else NAN


def complete_score(sections: dict[str, float], required: list[str], weights: dict[str, float] | None = None
                   ) -> tuple[float, list[str]]:
    """The weighted mean of ``required`` sections (equal weights by default), NaN when one is missing, and the
    missing ones: a score over fewer sections is not the leaderboard's number."""
    missing = [s for s in required if s not in sections or math.isnan(sections[s])]
    if missing:
        return NAN, missing
    w = weights or {s: 1.0 for s in required}
    return sum(sections[s] * w[s] for s in required) / sum(w[s] for s in required), []
