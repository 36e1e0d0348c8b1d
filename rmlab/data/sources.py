"""Record sources: local jsonl / jsonl.gz / json / csv / parquet files, and hub datasets.

Every record comes with its location (``file:line`` or ``dataset[split]:row``) so that any error
downstream can name the file, the line and the field.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input, with the location and what to do about it."""

    def __init__(self, where: str, problem: str, hint: str = ""):
        self.where, self.problem, self.hint = where, problem, hint
        super().__init__(f"{where}: {problem}" + (f"\n  -> {hint}" if hint else ""))


LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".parquet")


def resolve_paths(source: str) -> list[str]:
    """A file, a directory (all data files in it) or a glob; [] when nothing local matches."""
    if any(ch in source for ch in "*?["):
        return sorted(glob.glob(source))
    p = Path(source)
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.name.endswith(LOCAL_SUFFIXES))
    if p.exists():
        return [str(p)]
    return []


def read_records(source: str, split: str = "train", hub_kwargs: dict | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)``; a record that cannot be parsed is yielded as a ``DataError``.

    The caller decides (``data.on_error``) whether an error raises or becomes a counted skip.
    """
    paths = resolve_paths(os.path.expanduser(source))
    if not paths:
        if source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")):
            raise DataError(source, "file not found", "check data.source / data.data_dir (it is resolved from the repo root)")
        yield from _read_hub(source, split, hub_kwargs or {})
        return
    for path in paths:
        yield from _read_file(path)


def _read_file(path: str) -> Iterator[tuple[str, Any]]:
    if os.path.getsize(path) == 0:
        raise DataError(path, "the file is empty", "point data.source at a file with records")
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                where = f"{path}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, DataError(where, f"not valid UTF-8 ({e.reason} at byte {e.start})", "re-encode the file as UTF-8")
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DataError(where, f"malformed JSON ({e.msg}, column {e.colno})", "fix or remove the line, or set data.on_error=skip")
    elif name.endswith((".json", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                blob = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(path, f"not a valid JSON document ({e})", "a .json file must hold a list of records; use .jsonl for one record per line") from None
        if isinstance(blob, dict):  # {"data": [...]} or column-oriented
            lists = [v for v in blob.values() if isinstance(v, list)]
            blob = lists[0] if len(lists) == 1 else [blob]
        for n, rec in enumerate(blob):
            yield f"{path}[{n}]", rec
    elif name.endswith(".csv"):
        import csv

        with open(path, newline="", encoding="utf-8", errors="strict") as f:
            try:
                for n, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                    yield f"{path}:{n}", row
            except UnicodeDecodeError as e:
                raise DataError(path, f"not valid UTF-8 ({e.reason})", "re-encode the file as UTF-8") from None
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for n, rec in enumerate(table.to_pylist()):
            yield f"{path}[row {n}]", rec
    else:
        raise DataError(path, "unknown file type", f"use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_hub(name: str, split: str, kwargs: dict) -> Iterator[tuple[str, Any]]:
    """A hub dataset through ``datasets.load_dataset`` (needs network, or a populated HF cache)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError(name, "the `datasets` package is missing", "pip install datasets") from e
    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:
        raise DataError(
            f"{name}[{split}]",
            f"could not load the hub dataset ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "check the name and split, your network or HF_HUB_OFFLINE, or point data.source at a local file",
        ) from None
    for n, rec in enumerate(ds):
        yield f"{name}[{split}]:{n}", rec
