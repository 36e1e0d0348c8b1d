"""Record sources: local jsonl / jsonl.gz / json / csv / parquet files, and hub datasets.

Every record comes with its location (``file:line`` or ``dataset[split]:row``) so that any error
downstream can name the file, the line and the field.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input, with the location and what to do about it."""

    def __init__(self, where: str, problem: str, hint: str = ""):
        self.where, self.problem, self.hint = where, problem, hint
        super().__init__(f"{where}: {problem}" + (f"\n  -> {hint}" if hint else ""))


LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".parquet")

# A record nested deeper than this (lists in lists in ...) is malformed: no format reads more than a few
# levels, and a deeper one would reach Python's recursion limit in whatever walks it next.
MAX_DEPTH = 64
# U+D800..U+DFFF on its own: JSON can spell it ("\ud800") but it is not a character, and no UTF-8
# encoder (the tokenizer, the prompt hash, a written jsonl) accepts it.
_SURROGATE = re.compile("[\ud800-\udfff]")
GZIP_MAGIC = b"\x1f\x8b"
# Characters one CSV cell may hold (the csv module's default is 131,072: a long response would stop the file).
CSV_CELL_LIMIT = 2**31 - 1


class JsonObject(dict):
    """A JSON object as the readers decode it: a dict that also remembers the keys its text held more than
    once with different values (``duplicates``). ``json`` keeps the last of them silently; ``check_record``
    refuses such a record, naming the field, since which value was meant is unknowable."""

    __slots__ = ("duplicates",)


def same_json_value(a: Any, b: Any) -> bool:
    """Equal as JSON values; NaN equals NaN here (the same literal written twice is not a conflict)."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a is b or a == b


def _object_pairs(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = JsonObject(pairs)
    obj.duplicates = []
    if len(obj) != len(pairs):
        first: dict[str, Any] = {}
        for k, v in pairs:
            if k in first and not same_json_value(first[k], v) and k not in obj.duplicates:
                obj.duplicates.append(k)
            first.setdefault(k, v)
    return obj


# The readers' JSON decoder: json's own (NaN and Infinity literals parse, as they always did), with duplicate keys noted.
_DECODER = json.JSONDecoder(object_pairs_hook=_object_pairs)


def find_surrogate(s: str) -> int:
    """Index of the first lone surrogate in ``s``, or -1."""
    m = _SURROGATE.search(s)
    return m.start() if m else -1


def check_record(rec: Any, where: str) -> DataError | None:
    """The record's structural problems as a ``DataError`` naming the field, or None.

    Two things make a record unreadable for every consumer (training, eval, ``rmlab.score``), whatever
    its format: nesting deeper than ``MAX_DEPTH``, and a string (value or key) holding a lone surrogate,
    which cannot be encoded as UTF-8. NUL characters are legal text. The walk is iterative, so it
    cannot itself hit the recursion limit.
    """
    stack: list[tuple[Any, str, int]] = [(rec, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            i = find_surrogate(v)
            if i >= 0:
                return DataError(
                    where,
                    f"field {path or '(record)'!r} holds a lone surrogate ({ascii(v[i])} at character {i}), "
                    "which is not valid Unicode text",
                    "fix the text where the file was written (a surrogate pair split in two), or set "
                    "data.on_error=skip",
                )
        elif isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:
                top = re.split(r"[.\[]", path, maxsplit=1)[0] if path else "(record)"
                return DataError(
                    where,
                    f"field {top!r} is nested more than {MAX_DEPTH} levels deep",
                    "no format reads such nesting: fix the record, or set data.on_error=skip",
                )
            if isinstance(v, dict):
                dup = getattr(v, "duplicates", None)
                if dup:
                    name = f"{path}.{dup[0]}" if path else str(dup[0])
                    return DataError(
                        where,
                        f"field {name!r} is given twice, with different values",
                        "JSON keeps only the last one, so which was meant is unknowable: remove the duplicate, or set "
                        "data.on_error=skip",
                    )
                for k, x in v.items():
                    name = f"{path}.{k}" if path else str(k)
                    if isinstance(k, str) and find_surrogate(k) >= 0:
                        return DataError(
                            where,
                            f"field name {ascii(name)} holds a lone surrogate, which is not valid Unicode text",
                            "fix the field name where the file was written, or set data.on_error=skip",
                        )
                    stack.append((x, name, depth + 1))
            else:
                stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))
    return None


def _checked(where: str, rec: Any) -> tuple[str, Any]:
    bad = check_record(rec, where)
    return (where, bad) if bad is not None else (where, rec)


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
        local = Path(os.path.expanduser(source))
        if local.is_dir():
            others = sorted(f.name for f in local.iterdir())
            what = f"it holds {len(others)} other entries, e.g. {', '.join(others[:3])}" if others else "it is empty"
            yield (
                source,
                DataError(
                    source,
                    f"the folder has no data files ({what})",
                    f"put files ending in {', '.join(LOCAL_SUFFIXES)} in it, or point data.source at a file or glob",
                ),
            )
            return
        if any(ch in source for ch in "*?["):
            yield (
                source,
                DataError(
                    source,
                    "no file matches the pattern",
                    "check the folder and the pattern in data.source (a relative path starts in the directory you ran the command in)",
                ),
            )
            return
        if looks_local(source):
            yield (
                source,
                DataError(
                    source,
                    "file not found",
                    "check data.source and paths.data_dir (a relative path starts in the directory you ran the command in)",
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
    gz = name.endswith(".gz")
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        yield path, DataError(path, f"cannot read the file ({e.strerror})", "check its permissions and data.source")
        return
    if gz and magic != GZIP_MAGIC:
        yield (
            path,
            DataError(
                path,
                "the name ends in .gz but the file is not gzip-compressed",
                f"if it is plain text, rename it to {os.path.basename(path)[:-3]}; otherwise download or "
                "compress it again",
            ),
        )
        return
    if not gz and magic == GZIP_MAGIC and name.endswith((".jsonl", ".json", ".csv")):
        yield (
            path,
            DataError(
                path,
                "the file is gzip-compressed but its name does not end in .gz",
                f"rename it to {os.path.basename(path)}.gz",
            ),
        )
        return
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
        rows = table.to_pylist()
        if not rows:
            yield path, _no_records(path)
        for n, rec in enumerate(rows):
            yield _checked(f"{path}:row {n}", rec)
    else:
        yield path, DataError(path, "unknown file type", f"use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(path: str, opener: Any) -> Iterator[tuple[str, Any]]:
    with opener(path, "rb") as f:
        n = records = 0
        try:
            for n, raw in enumerate(f, start=1):
                where = f"{path}:{n}"
                try:
                    # utf-8-sig on the first line: a byte-order mark (editors on Windows write one) is not JSON.
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    records += 1
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
                records += 1
                try:
                    rec = _DECODER.decode(line)
                except json.JSONDecodeError as e:
                    fix = "fix or remove the line, or set data.on_error=skip"
                    if "\r" in line.rstrip("\r\n"):  # JSON text never holds a raw CR: these are line ends
                        fix = ("the line holds carriage returns: the file has old Mac (CR-only) line endings; "
                               "convert them to \\n (tr '\\r' '\\n' < in > out)")
                    yield where, DataError(where, f"malformed JSON ({e.msg}, column {e.colno})", fix)
                    continue
                except RecursionError:  # the decoder recurses once per [ or {
                    yield where, _too_deep(where)
                    continue
                except ValueError as e:  # e.g. an integer of more than 4,300 digits
                    yield (
                        where,
                        DataError(
                            where,
                            f"unreadable JSON ({str(e)[:80]})",
                            "fix or remove the line, or set data.on_error=skip",
                        ),
                    )
                    continue
                yield _checked(where, rec)
        except EOFError as e:  # a truncated .gz: everything before it was read
            yield f"{path}:{n + 1}", DataError(f"{path}:{n + 1}", f"the file is cut off ({e})", "download it again")
            return
        except (OSError, zlib.error) as e:  # bad CRC, damaged deflate data, a read error
            yield (
                f"{path}:{n + 1}",
                DataError(f"{path}:{n + 1}", f"the compressed data is damaged ({e})", "download it again"),
            )
            return
    if records == 0:
        yield path, _no_records(path)


def _too_deep(where: str) -> DataError:
    return DataError(
        where,
        "the JSON is nested too deeply to read",
        f"no format reads more than a few levels ({MAX_DEPTH} at most): fix the record, or set data.on_error=skip",
    )


def _no_records(path: str) -> DataError:
    return DataError(
        path, "the file has no records (only blank lines, a header, or an empty list)", "point data.source at a file with records"
    )


def _read_json(path: str, opener: Any) -> Iterator[tuple[str, Any]]:
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is skipped
            blob = _DECODER.decode(f.read())
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
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        yield path, DataError(path, f"unreadable JSON ({str(e)[:80]})", "fix the document")
        return
    except RecursionError:
        yield path, _too_deep(path)
        return
    except EOFError as e:
        yield path, DataError(path, f"the file is cut off ({e})", "download it again")
        return
    except (OSError, zlib.error) as e:
        yield path, DataError(path, f"the compressed data is damaged ({e})", "download it again")
        return
    if isinstance(blob, dict):  # {"data": [...]} or a single record
        lists = [v for v in blob.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        blob = lists[0] if len(lists) == 1 else [blob]
    elif not isinstance(blob, list):  # a bare string or number: one (bad) record, reported by the adapter
        blob = [blob]
    if not blob:
        yield path, _no_records(path)
        return
    for n, rec in enumerate(blob):
        yield _checked(f"{path}:record {n}", rec)


def _read_csv(path: str) -> Iterator[tuple[str, Any]]:
    # surrogateescape keeps undecodable bytes as markers, so one bad row is reported (or skipped)
    # with its line number instead of failing the whole file.
    # utf-8-sig: a leading byte-order mark (Excel writes one) would otherwise stick to the first column's name.
    # A cell may hold a long response: the csv module's default cap of 128 KiB per cell is lifted (for all readers
    # in this process; the cap guards nothing here, as a jsonl line has none).
    csv.field_size_limit(max(csv.field_size_limit(), CSV_CELL_LIMIT))
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        rows = 0
        try:
            header = reader.fieldnames or []
            # Unnamed columns are not fields (Excel saves the blank columns it was given): several are not a duplicate.
            twice = sorted({c for c in header if c.strip() and header.count(c) > 1})
            if twice:
                where = f"{path}:1"
                yield (
                    where,
                    DataError(
                        where,
                        f"column {twice[0]!r} appears more than once in the header",
                        "csv keeps only the last such column: rename or remove the duplicate",
                    ),
                )
                return
            for row in reader:
                rows += 1
                where = f"{path}:{start}"
                start = reader.line_num + 1
                yield where, _csv_row(row, where)
        except csv.Error as e:  # the csv module's own refusal (e.g. a cell of more than CSV_CELL_LIMIT characters)
            where = f"{path}:{reader.line_num or 1}"
            yield where, DataError(where, f"unreadable CSV ({e})", "fix the file; the rows after this line are not read")
            return
    if rows == 0:
        yield path, _no_records(path)


def _csv_row(row: dict, where: str) -> Any:
    """The row, or a DataError for undecodable bytes or more cells than header columns."""
    bad = [k for k, v in row.items() if isinstance(v, str) and _has_surrogate(v)]
    if bad or any(_has_surrogate(str(k)) for k in row):
        return DataError(
            where,
            f"not valid UTF-8 in column {bad[0] if bad else '(header)'!r}",
            "re-encode the file as UTF-8, or set data.on_error=skip",
        )
    if None in row:  # more cells than header columns
        return DataError(
            where,
            f"{len(row) - 1 + len(row[None])} cells for {len(row) - 1} header columns",
            "quote cells that hold commas",
        )
    return row


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
