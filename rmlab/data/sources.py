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


def read_records(
    source: str | list[str], split: str = "train", hub_kwargs: dict | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)``; anything that cannot be read is yielded as a ``DataError``.

    ``source`` is a file, a directory, a glob, a list of those, or a hub dataset name. File-level
    problems (missing, empty, undecodable document) are yielded too, with the file as location, so
    the caller decides (``data.on_error``) whether an error raises or becomes a counted skip.
    """
    if isinstance(source, (list, tuple)):
        for one in source:
            yield from read_records(str(one), split, hub_kwargs)
        return
    paths = resolve_paths(os.path.expanduser(source))
    if not paths:
        if looks_local(source):
            yield (
                source,
                DataError(
                    source,
                    "file not found",
                    "check data.source and paths.data_dir (relative paths start at the repo root)",
                ),
            )
            return
        yield from _read_hub(source, split, hub_kwargs or {})
        return
    for path in paths:
        yield from _read_file(path)


def looks_local(source: str) -> bool:
    """A name with a data-file suffix or a path prefix is a file, never a hub dataset."""
    return source.lower().endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~"))


def _read_file(path: str) -> Iterator[tuple[str, Any]]:
    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:
        yield path, DataError(path, f"cannot read the file ({e.strerror})", "check its permissions and data.source")
        return
    if empty:
        yield path, DataError(path, "the file is empty", "point data.source at a file with records")
        return
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(path, gzip.open if name.endswith(".gz") else open)
    elif name.endswith((".json", ".json.gz")):
        yield from _read_json(path, gzip.open if name.endswith(".gz") else open)
    elif name.endswith(".csv"):
        yield from _read_csv(path)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            yield (
                path,
                DataError(
                    path, f"not a readable parquet file ({type(e).__name__}: {str(e)[:120]})", "re-export the file"
                ),
            )
            return
        for n, rec in enumerate(table.to_pylist()):
            yield f"{path}:row {n}", rec
    else:
        yield path, DataError(path, "unknown file type", f"use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(path: str, opener: Any) -> Iterator[tuple[str, Any]]:
    with opener(path, "rb") as f:
        n = 0
        try:
            for n, raw in enumerate(f, start=1):
                where = f"{path}:{n}"
                try:
                    # utf-8-sig on the first line: a byte-order mark (editors on Windows write one) is not JSON.
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield (
                        where,
                        DataError(
                            where,
                            f"not valid UTF-8 ({e.reason} at byte {e.start})",
                            "re-encode the file as UTF-8, or set data.on_error=skip",
                        ),
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield (
                        where,
                        DataError(
                            where,
                            f"malformed JSON ({e.msg}, column {e.colno})",
                            "fix or remove the line, or set data.on_error=skip",
                        ),
                    )
        except (OSError, EOFError) as e:  # a truncated .gz: everything before it was read
            yield f"{path}:{n + 1}", DataError(f"{path}:{n + 1}", f"the file is cut off ({e})", "download it again")


def _read_json(path: str, opener: Any) -> Iterator[tuple[str, Any]]:
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is skipped
            blob = json.load(f)
    except json.JSONDecodeError as e:
        where = f"{path}:{e.lineno}"
        yield (
            where,
            DataError(
                where,
                f"not a valid JSON document ({e.msg}, column {e.colno})",
                "a .json file holds one list of records; use .jsonl for one record per line",
            ),
        )
        return
    except UnicodeDecodeError as e:
        yield path, DataError(path, f"not valid UTF-8 ({e.reason} at byte {e.start})", "re-encode the file as UTF-8")
        return
    if isinstance(blob, dict):  # {"data": [...]} or a single record
        lists = [v for v in blob.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        blob = lists[0] if len(lists) == 1 else [blob]
    for n, rec in enumerate(blob):
        yield f"{path}:record {n}", rec


def _read_csv(path: str) -> Iterator[tuple[str, Any]]:
    import csv

    # surrogateescape keeps undecodable bytes as markers, so one bad row is reported (or skipped)
    # with its line number instead of failing the whole file.
    # utf-8-sig: a leading byte-order mark (Excel writes one) would otherwise stick to the first column's name.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            bad = [k for k, v in row.items() if isinstance(v, str) and _has_surrogate(v)]
            if bad or any(_has_surrogate(str(k)) for k in row):
                yield (
                    where,
                    DataError(
                        where,
                        f"not valid UTF-8 in column {bad[0] if bad else '(header)'!r}",
                        "re-encode the file as UTF-8, or set data.on_error=skip",
                    ),
                )
                continue
            if None in row:  # more cells than header columns
                yield (
                    where,
                    DataError(
                        where,
                        f"{len(row) - 1 + len(row[None])} cells for {len(row) - 1} header columns",
                        "quote cells that hold commas",
                    ),
                )
                continue
            yield where, row


def _has_surrogate(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


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
