"""Property-based fuzzing of the reader, the field mapping and every format adapter.

Random jsonl files (random keys, types and nesting; text with lone surrogates, NUL and HH markers;
numbers that are NaN, infinite, huge or strings; missing and null fields; blank lines, broken JSON,
non-UTF-8 bytes, gzip that is cut off) go through ``read_records`` + ``records_to_groups``:

- under ``on_error=skip`` nothing raises, ``loaded = kept + sum(dropped)`` holds, and what is kept is
  clean: finite margins, scores and ranks, valid Unicode text, consistent groups;
- under ``on_error=raise`` the result is the same groups, or a ``DataError`` whose location is the file
  or one of its lines; never another exception type. A DataError under raise is a counted
  ``bad_record`` under skip, and a run without one keeps exactly what skip keeps.

Seeded (``derandomize``) and bounded, so CI runs the same few hundred files each time in seconds
(``RMLAB_FUZZ_EXAMPLES`` raises the count for a longer local hunt).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import tempfile
from pathlib import Path

import pytest

# A plain import: hypothesis is in the dev extra that `make test` installs, so CI without it fails here
# instead of skipping the fuzz tests in silence (they were an importorskip).
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rmlab.data.formats import MAX_ABS, MULTI_FIELDS, records_to_groups  # noqa: E402
from rmlab.data.sources import DataError, read_records  # noqa: E402
from rmlab.data.types import DataReport  # noqa: E402

# RMLAB_FUZZ_EXAMPLES=2000 for a longer hunt; CI runs the default.
EXAMPLES = int(os.environ.get("RMLAB_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------- values

SPECIAL_TEXT = ["\ud800", "\udfff", "\x00", "\n\nAssistant:", "\n\nHuman:", " ", "", "a", "b", "é", "\U0001f600"]
texts = st.lists(st.text(max_size=4) | st.sampled_from(SPECIAL_TEXT), max_size=4).map("".join)
SPECIAL_NUMBERS = [
    1e308, -1e308, MAX_ABS, -MAX_ABS, 1e31, 0, 1, 2, 3, -1, 0.5, 10**400, -(10**400),
    "inf", "-Infinity", "nan", "NaN", "1e400", "", " 3 ", "1", "2", "0", "A>B", "B", "tie", "first",
    True, False, None,
]  # fmt: skip
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.sampled_from(SPECIAL_NUMBERS)
scalars = texts | numbers
NAMES = [
    "prompt", "chosen", "rejected", "response", "responses", "score", "scores", "ranks", "m", "s", "l",
    "cs", "rs", "rk", "h1", "h2", "sub", "instruction", "input", "a1", "a2",
]  # fmt: skip
keys = st.sampled_from(NAMES) | texts
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=10
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": texts})
    | st.dictionaries(st.sampled_from(["role", "content", "text"]), scalars, max_size=3),
    max_size=3,
)
responses = st.lists(texts | st.fixed_dictionaries({"response": texts, "score": numbers}), max_size=4)


def value_for(name: str):
    """A value that is often of the right shape for the field it lands in, and sometimes anything."""
    if name in ("chosen", "rejected"):
        likely = texts | messages
    elif name == "responses":
        likely = responses
    elif name in ("scores", "ranks", "rk", "l"):
        likely = st.lists(numbers, max_size=4)
    elif name in ("prompt", "response", "instruction", "input", "sub"):
        likely = texts
    else:
        likely = numbers | st.lists(numbers, max_size=3)
    return st.one_of(likely, likely, anything)


record = st.fixed_dictionaries(
    {},
    optional={name: st.deferred(lambda n=name: value_for(n)) for name in NAMES},
).flatmap(lambda rec: st.dictionaries(keys, anything, max_size=2).map(lambda extra: {**extra, **rec}))

# one line of the file: a record, or something a file of records may also hold
line = st.one_of(
    record.map(lambda r: json.dumps(r).encode()),  # NaN, Infinity written as is; surrogates as \udXXX escapes
    record.map(lambda r: json.dumps(r).encode()),
    record.map(lambda r: json.dumps(r).encode()),
    st.sampled_from([b"", b"  ", b"\t"]),  # blank lines
    anything.map(lambda v: json.dumps(v).encode()),  # not an object
    st.binary(max_size=12),  # broken JSON, invalid UTF-8
    record.map(lambda r: json.dumps(r).encode()[:-3]),  # cut short
    st.integers(30, 80).map(lambda n: b'{"prompt": ' + b"[" * n + b"]" * n + b"}"),  # deep (> 64 levels)
    st.just(b"[" * 5000 + b"]" * 5000),  # past the decoder's recursion limit
    st.just(b'{"prompt": "p", "score": ' + b"9" * 5000 + b"}"),  # an int Python refuses to parse
)

# ---------------------------------------------------------------- formats and field mappings

# (format, fields, format_options): the defaults, and mappings onto the fuzzed names
CONFIGS = [
    ("pairs", None, {}),
    ("pairs", {"margin": "m", "strength": "s", "label": "l", "subset": "sub"}, {}),
    ("pairs", {"chosen_score": "cs", "rejected_score": "rs"}, {"group_by_prompt": True}),
    ("pairs", {"prompt": ["instruction", "input"], "label": ["a1", "a2", "l"]}, {"label_map": {"x": "tie"}}),
    ("implicit_prompt", {"margin": "m"}, {}),
    ("chat", {"prompt": "prompt", "chosen_score": "cs", "rejected_score": "rs"}, {}),
    ("ratings", None, {"tie_eps": 0.1}),
    ("ratings", {"score": "scores"}, {"score_reduce": "median", "max_k": 2}),
    ("ratings", {"attributes": ["h1", "h2"]}, {"max_k": 3, "max_k_strategy": "random", "pairing": "adjacent"}),
    ("ratings", {"responses": "responses", "scores": "scores"}, {"pairing": "best_vs_rest", "max_prompts": 2}),
    ("ratings", {"responses": "responses"}, {"score_offset": -1.0}),
    ("rankings", None, {}),
    ("rankings", {"ranks": "rk"}, {"higher_is_better": False, "pairing": "adjacent"}),
]
LOGICAL = {
    "pairs": ["prompt", "chosen", "rejected", "margin", "strength", "label", "chosen_score", "rejected_score"],
    "implicit_prompt": ["chosen", "rejected", "margin", "subset"],
    "chat": ["prompt", "chosen", "rejected", "margin", "chosen_score", "rejected_score"],
    "ratings": ["prompt", "response", "score", "responses", "scores", "attributes"],
    "rankings": ["prompt", "responses", "ranks"],
}


@st.composite
def random_mapping(draw):
    """A random but valid data.fields: each logical field mapped to one of the fuzzed names (or several,
    where the format joins them)."""
    fmt = draw(st.sampled_from(sorted(LOGICAL)))
    fields = {}
    for key in draw(st.lists(st.sampled_from(LOGICAL[fmt]), max_size=3, unique=True)):
        one = st.sampled_from(NAMES)
        several = st.lists(one, min_size=1, max_size=3)
        fields[key] = draw(st.one_of(one, several) if key in MULTI_FIELDS[fmt] else one)
    return fmt, fields, {}


def write_file(dirpath: str, lines: list[bytes], container: str) -> str:
    body = b"".join(x + b"\n" for x in lines)
    if container == "jsonl":
        path = Path(dirpath) / "d.jsonl"
        path.write_bytes(body)
    else:
        path = Path(dirpath) / "d.jsonl.gz"
        data = gzip.compress(body)
        path.write_bytes(data[: max(10, len(data) - 7)] if container == "gz_cut" else data)
    return str(path)


def run(path: str, fmt: str, fields, options: dict, on_error: str):
    report = DataReport()
    groups = records_to_groups(read_records(path), fmt, fields, report, on_error=on_error, **options)
    return groups, report


def finite32(x: float) -> bool:
    return math.isfinite(x) and abs(x) <= 4 * MAX_ABS  # gaps of two in-range values, plus a finite offset


def valid_text(t: str) -> bool:
    try:
        t.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_clean(groups, report: DataReport) -> None:
    """What is kept: counted, well formed, finite, valid text."""
    assert report.balanced, report.to_dict()
    assert report.kept == sum(g.n_records for g in groups) and report.kept >= 0
    assert all(v > 0 for v in report.dropped.values()), report.dropped
    for g in groups:
        g.validate()
        assert valid_text(g.prompt) and all(valid_text(r) for r in g.responses)
        for c in g.comparisons:
            assert c.margin is None or finite32(c.margin), c
            assert c.strength is None or c.strength in (0, 1, 2, 3)
            assert math.isfinite(c.weight)
        assert all(finite32(s) for s in g.scores or [])
        assert all(math.isfinite(r) for r in g.ranks or [])
        for row in g.attributes or []:
            assert all(math.isnan(a) or finite32(a) for a in row)


def check_both_modes(path: str, n_lines: int, fmt: str, fields, options: dict, n_records: int | None = None) -> None:
    groups, report = run(path, fmt, fields, options, "skip")  # must not raise
    check_clean(groups, report)
    if n_records is not None:  # a whole file: every record in it is read and counted (kept or dropped)
        assert report.loaded == n_records, (report.loaded, n_records, report.to_dict())
    bad = sum(v for k, v in report.dropped.items() if k.startswith("bad_record: "))
    try:
        raised, r_report = run(path, fmt, fields, options, "raise")
    except DataError as e:
        msg = str(e)
        assert msg.startswith(path) and e.where.startswith(path), msg
        m = re.fullmatch(re.escape(path) + r"(?::(\d+)(?: \S+)?)?", e.where)
        assert m, e.where  # the file, or the file and a line (and an item in it: "d.jsonl:3 responses[1]")
        if m.group(1):  # a line of the file (a cut-off gzip: the line after the last one read)
            assert 1 <= int(m.group(1)) <= n_lines + 1, (e.where, n_lines)
        msg.encode("utf-8")  # printable, even when the record held a lone surrogate
        assert bad >= 1, report.dropped  # what raised is a counted bad_record under skip
        return
    except Exception as e:  # pragma: no cover - the property under test
        pytest.fail(f"on_error=raise let {type(e).__name__} escape: {str(e)[:200]}")
    # no error under raise: the same records kept, and no bad_record under skip either
    assert bad == 0, report.dropped
    check_clean(raised, r_report)
    assert [(g.prompt, g.responses) for g in raised] == [(g.prompt, g.responses) for g in groups]
    assert r_report.to_dict() == report.to_dict()


def records_in(lines: list[bytes], container: str = "jsonl") -> int:
    """Records a whole jsonl file of these lines holds: one per physical line (a generated line may hold a newline
    itself) that is not blank text; a line that is not UTF-8 is a record too (a bad one). A file of nothing else,
    or a plain .jsonl that starts with gzip's magic bytes, is one counted bad_record for the whole file."""
    body = b"".join(x + b"\n" for x in lines)
    if container == "jsonl" and body[:2] == b"\x1f\x8b":
        return 1
    n = 0
    for i, raw in enumerate(body.split(b"\n")[:-1]):
        try:
            n += bool(raw.decode("utf-8-sig" if i == 0 else "utf-8").strip())
        except UnicodeDecodeError:
            n += 1
    return n or 1


files = st.tuples(st.lists(line, max_size=8), st.sampled_from(["jsonl", "jsonl", "jsonl", "gz", "gz_cut"]))


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIGS)])
@FUZZ
@given(data=files)
def test_every_format_accounts_for_every_record_or_names_the_line(config, data):
    fmt, fields, options = config
    lines, container = data
    with tempfile.TemporaryDirectory() as d:
        whole = None if container == "gz_cut" else records_in(lines, container)
        check_both_modes(write_file(d, lines, container), len(lines), fmt, fields, options, whole)


@FUZZ
@given(mapping=random_mapping(), lines=st.lists(line, min_size=1, max_size=6))
def test_any_field_mapping_accounts_for_every_record_or_names_the_line(mapping, lines):
    fmt, fields, options = mapping
    with tempfile.TemporaryDirectory() as d:
        check_both_modes(write_file(d, lines, "jsonl"), len(lines), fmt, fields, options, records_in(lines))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(records=st.lists(record, max_size=5), config=st.sampled_from(CONFIGS))
def test_records_built_in_code_give_a_data_error_or_a_counted_drop(records, config):
    """The adapters alone (no reader), on Python values the reader would never produce as well."""
    fmt, fields, options = config
    located = [(f"mem:{i + 1}", r) for i, r in enumerate(records)]
    report = DataReport()
    groups = records_to_groups(iter(located), fmt, fields, report, on_error="skip", **options)
    check_clean(groups, report)
    try:
        records_to_groups(iter(located), fmt, fields, DataReport(), on_error="raise", **options)
    except DataError as e:
        assert re.fullmatch(r"mem:\d+( .*)?", e.where), e.where
