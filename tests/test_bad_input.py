"""Malformed input: each kind is a DataError naming file, line and field (with what to do next), or a
counted skip under data.on_error=skip. Nothing escapes as a bare traceback from inside a parser."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rmlab.data.formats import records_to_groups
from rmlab.data.sources import DataError, read_records
from rmlab.data.types import DataReport

GOOD = {"prompt": "p0", "chosen": "good", "rejected": "bad"}


def jl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _csv_bad_bytes(p: Path) -> None:
    p.write_bytes(b"prompt,chosen,rejected\np0,good,bad\np1,caf\xe9,bad\n")


def _parquet_missing_column(p: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p0", "chosen": "good", "rejected": "bad"}, {"prompt": "p1", "chosen": "x"}]),
        p,
    )


# (kind, file name, content or writer, format, fields, format_options, expected message parts, location suffix)
CASES = [
    (
        "malformed_json",
        "d.jsonl",
        jl(GOOD, b'{"prompt": "p1", "chosen": "x",'),
        "pairs",
        None,
        {},
        ["malformed JSON", "set data.on_error=skip"],
        ":2",
    ),
    (
        "missing_field",
        "d.jsonl",
        jl(GOOD, {"prompt": "p1", "answer": "x", "rejected": "y"}),
        "pairs",
        None,
        {},
        ["missing field 'chosen'", "fields present: answer, prompt, rejected", "data.fields.chosen="],
        ":2",
    ),
    (
        "non_utf8",
        "d.jsonl",
        jl(GOOD, b'{"prompt": "p1", "chosen": "caf\xe9", "rejected": "y"}'),
        "pairs",
        None,
        {},
        ["not valid UTF-8", "re-encode"],
        ":2",
    ),
    (
        "list_for_string",
        "d.jsonl",
        jl(GOOD, {"prompt": "p1", "chosen": ["a", "b"], "rejected": "y"}),
        "pairs",
        None,
        {},
        ["field 'chosen' must be a string, got list", "data.fields.chosen"],
        ":2",
    ),
    (
        "unparseable_score",
        "r.jsonl",
        jl({"prompt": "p", "response": "a", "score": 1}, {"prompt": "p", "response": "b", "score": "high"}),
        "ratings",
        None,
        {},
        ["field 'score' = 'high' is not a number"],
        ":2",
    ),
    (
        "record_not_object",
        "d.jsonl",
        jl(GOOD, [1, 2]),
        "pairs",
        None,
        {},
        ["a record must be an object, got list"],
        ":2",
    ),
    (
        "unknown_label",
        "d.jsonl",
        jl({**GOOD, "w": 1}, {**GOOD, "prompt": "p1", "w": "C"}),
        "pairs",
        {"label": "w"},
        {},
        ["label 'w' = 'C'", "label_map"],
        ":2",
    ),
    ("csv_non_utf8", "d.csv", _csv_bad_bytes, "pairs", None, {}, ["not valid UTF-8 in column 'chosen'"], ":3"),
    (
        "parquet_missing_value",
        "d.parquet",
        _parquet_missing_column,
        "pairs",
        None,
        {},
        ["field 'rejected' is null", "data.fields.rejected"],  # the column exists; this row's value is null
        ":row 1",
    ),
    (
        "null_field",
        "d.jsonl",
        jl(GOOD, {"prompt": "p1", "chosen": None, "rejected": "y"}),
        "pairs",
        None,
        {},
        ["field 'chosen' is null", "data.fields.chosen=", "data.on_error=skip"],
        ":2",
    ),
    (
        "strength_out_of_range",
        "d.jsonl",
        jl({**GOOD, "s": 2}, {**GOOD, "prompt": "p1", "s": 7}),
        "pairs",
        {"strength": "s"},
        {},
        ["field 's' = 7 is not a strength 0..3", "data.fields.strength", "data.on_error=skip"],
        ":2",
    ),
    (
        "strength_not_a_level",
        "d.jsonl",
        jl({**GOOD, "s": "3"}, {**GOOD, "prompt": "p1", "s": 1.5}),
        "pairs",
        {"strength": "s"},
        {},
        ["field 's' = 1.5 is not a strength 0..3"],
        ":2",
    ),
    (
        "extract_marker_missing",
        "x.jsonl",
        jl({"t": "###Q: a ###R: b", "s": 1}, {"t": "no markers here", "s": 2}),
        "ratings",
        {"prompt": "t", "response": "t", "score": "s"},
        {"extract": {"prompt": ["###Q:", "###R:"], "response": ["###R:", None]}},
        ["no '###Q:' marker", "data.format_options.extract.prompt"],
        ":2",
    ),
    (
        "chat_message_shape",
        "c.jsonl",
        jl(
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
            },
            {"chosen": [{"role": "user", "text": "q"}], "rejected": []},
        ),
        "chat",
        None,
        {},
        ["field 'chosen', message 0: needs string 'role' and 'content'"],
        ":2",
    ),
    (
        "json_document_broken",
        "d.json",
        b'[{"prompt": "p0", "chosen": "a", "rejected": "b"},\n {"prompt": oops}]',
        "pairs",
        None,
        {},
        ["not a valid JSON document"],
        ":2",
    ),
    (
        "truncated_gzip",
        "d.jsonl.gz",
        gzip.compress(jl(GOOD, {**GOOD, "prompt": "p1"}) * 50)[:-30],
        "pairs",
        None,
        {},
        ["the file is cut off"],
        "",
    ),
]


def _write(tmp_path: Path, name: str, content) -> Path:
    p = tmp_path / name
    content(p) if callable(content) else p.write_bytes(content)
    return p


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(tmp_path, case):
    kind, name, content, fmt, fields, options, parts, loc = case
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        records_to_groups(read_records(str(path)), fmt, fields, DataReport(), **options)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg  # names the file...
    assert loc in e.value.where, msg  # ...and the line (or row)
    assert e.value.hint, msg  # and says what to do next
    for part in parts:
        assert part in msg, msg


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_counted_skip(tmp_path, case):
    kind, name, content, fmt, fields, options, parts, loc = case
    path = _write(tmp_path, name, content)
    report = DataReport()
    groups = records_to_groups(read_records(str(path)), fmt, fields, report, on_error="skip", **options)
    skipped = {k: v for k, v in report.dropped.items() if k.startswith("bad_record: ")}
    assert sum(skipped.values()) == 1, report.dropped
    assert report.balanced and report.kept == sum(g.n_records for g in groups)
    if kind == "truncated_gzip":
        # the records before the cut are read: p0 and p1 kept, the repeats of them counted as duplicates
        assert [g.prompt for g in groups] == ["p0", "p1"] and report.loaded > 3
        assert dict(report.dropped) == {"duplicate": report.loaded - 3, "bad_record: the file is cut off": 1}
    elif kind == "json_document_broken":
        assert report.loaded == 1 and not groups  # one JSON document: the whole file is the skipped unit
    elif fmt == "ratings":  # the good record's response is then alone under its prompt: no comparison, counted
        assert report.loaded == 2 and not groups and report.dropped["single_response_prompt"] == 1
    else:
        assert report.kept == 1 and report.loaded == 2


@pytest.mark.parametrize("kind", ["empty_file", "missing_file"])
def test_empty_and_missing_files(tmp_path, kind):
    path = tmp_path / "gone.jsonl"
    if kind == "empty_file":
        path.write_bytes(b"")
    with pytest.raises(DataError, match="file is empty" if kind == "empty_file" else "file not found") as e:
        records_to_groups(read_records(str(path)), "pairs", None, DataReport())
    assert e.value.where == str(path) and e.value.hint
    # In a folder of files, a bad file is one counted skip and the others still load.
    (tmp_path / "ok.jsonl").write_bytes(jl(GOOD))
    report = DataReport()
    groups = records_to_groups(
        read_records([str(path), str(tmp_path / "ok.jsonl")]), "pairs", None, report, on_error="skip"
    )
    assert len(groups) == 1 and report.loaded == 2 and report.balanced
    assert list(report.dropped) == [
        "bad_record: the file is empty" if kind == "empty_file" else "bad_record: file not found"
    ]


def test_nan_and_inf_margins_are_counted_drops(tmp_path):
    path = _write(
        tmp_path,
        "m.jsonl",
        b'{"prompt":"a","chosen":"x","rejected":"y","m":NaN}\n{"prompt":"b","chosen":"x","rejected":"y","m":Infinity}\n'
        + jl({"prompt": "c", "chosen": "x", "rejected": "y", "m": 1.5}),
    )
    report = DataReport()
    groups = records_to_groups(read_records(str(path)), "pairs", {"margin": "m"}, report)
    assert [g.comparisons[0].margin for g in groups] == [1.5] and dict(report.dropped) == {"nonfinite_margin": 2}


def test_bad_input_through_train_names_file_and_line(tmp_path):
    """The same error reaches a user of `python train.py` with the config key to set."""
    from tests.conftest import compose

    path = _write(tmp_path, "mine.jsonl", jl(GOOD, {"question": "q", "good": "a", "bad": "b"}))
    cfg = compose(
        ["model=tiny_llama", "data=hh_harmless", f"data.source={path}", "data.format=pairs"], tmp_path / "run"
    )
    from hydra.utils import instantiate

    from rmlab.models import build_tokenizer

    dm = instantiate(cfg.data, tokenizer=build_tokenizer("byt5", None), _convert_="all")
    with pytest.raises(
        DataError,
        match=r"mine.jsonl:2: missing field 'prompt'.*\n.*fields present: bad, good, question; set data.fields.prompt=",
    ):
        dm.setup("fit")


def test_a_null_field_is_not_called_missing(tmp_path):
    path = _write(tmp_path, "d.jsonl", jl({"prompt": "p", "chosen": None, "rejected": "y"}))
    with pytest.raises(DataError) as e:
        records_to_groups(read_records(str(path)), "pairs", None, DataReport())
    # The old message said "missing field 'chosen'" while listing chosen among the fields present.
    assert "missing" not in str(e.value) and "fields present" not in str(e.value)
    assert e.value.problem == "field 'chosen' is null (the 'chosen' field of this format)"


def test_strengths_in_range_are_kept_as_levels(tmp_path):
    rows = [{**GOOD, "prompt": f"p{i}", "s": s} for i, s in enumerate([0, 1, 2.0, "3", None])]
    path = _write(tmp_path, "d.jsonl", jl(*rows))
    groups = records_to_groups(read_records(str(path)), "pairs", {"strength": "s"}, DataReport())
    assert [g.comparisons[0].strength for g in groups] == [0, 1, 2, 3, None]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.csv"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name):
    rows = [{"prompt": "p0", "chosen": "café", "rejected": "bad"}, {"prompt": "p1", "chosen": "x", "rejected": "y"}]
    if name.startswith("d.jsonl"):
        body = jl(*rows)
    elif name == "d.json":
        body = json.dumps(rows).encode()
    else:
        body = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
        body = body.encode()
    body = b"\xef\xbb\xbf" + body
    path = _write(tmp_path, name, gzip.compress(body) if name.endswith(".gz") else body)
    report = DataReport()
    groups = records_to_groups(read_records(str(path)), "pairs", None, report)
    assert [(g.prompt, *g.responses) for g in groups] == [("p0", "café", "bad"), ("p1", "x", "y")]
    assert report.loaded == report.kept == 2 and not report.dropped


def test_a_byte_order_mark_inside_a_jsonl_file_is_still_malformed(tmp_path):
    path = _write(tmp_path, "d.jsonl", jl(GOOD) + b"\xef\xbb\xbf" + jl({**GOOD, "prompt": "p1"}))
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        records_to_groups(read_records(str(path)), "pairs", None, DataReport())


def test_old_mac_line_endings_say_so(tmp_path):
    """A CR-only file reads as one line; the error says why and how to convert it, not only "Extra data"."""
    body = json.dumps(GOOD).encode() + b"\r" + json.dumps({**GOOD, "prompt": "p1"}).encode() + b"\r"
    path = _write(tmp_path, "d.jsonl", body)
    with pytest.raises(DataError, match=r"(?s)d.jsonl:1: malformed JSON .*CR-only\) line endings"):
        records_to_groups(read_records(str(path)), "pairs", None, DataReport())
    crlf = _write(tmp_path, "e.jsonl", body.replace(b"\r", b"\r\n"))  # Windows line ends still read
    assert len(records_to_groups(read_records(str(crlf)), "pairs", None, DataReport())) == 2
