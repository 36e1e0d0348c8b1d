"""Mutation fuzzing of every input rmlab reads, through the paths the entry points use.

Real records from ../shared/data (HH-RLHF, PandaLM, AlpacaEval 2, Prometheus), put into every data format
(pairs with labels, margins, strengths or side scores; implicit-prompt HH; ratings long and wide, with
attributes, with critiques and extraction; rankings with ranks or in order; chat messages) and into each
benchmark's schema, are mutated one field at a time: wrong types (list, dict, bool, null, number as string),
huge and non-finite numbers (10**400, 1e309, NaN, "-inf"), deep nesting, empty / whitespace / invisible-only
text (U+200B, U+FEFF, U+00A0), lone surrogates, NUL, very long text, duplicate keys, missing and extra fields,
broken chat messages, rankings with one response or ties. Files are mutated too: BOM, CRLF, a cut-off last
line, cut-off and damaged gzip, non-UTF-8 bytes, empty and blank-only files, .json / .csv / .parquet variants.

The standard asserted for each case:
- ``data.on_error=raise``: the record is read, or a ``DataError`` names the file and the mutated line (never
  another exception);
- ``data.on_error=skip``: nothing raises, every record is accounted for (``loaded = kept + dropped``) and a
  record that raised is a counted ``bad_record`` drop; through ``RewardDataModule.setup`` no batch a loss
  reads holds an infinite or beyond-``MAX_ABS`` value;
- benchmark loaders (eval.py benchmark=...) and ``rmlab.score``: the rows are scored, or a ``DataError`` names
  the file and row; broken exports and tokenized caches: a ``CheckpointError`` naming the file, or a rebuild.

Deterministic: the cases are a fixed grid, plus a sample drawn with ``random.Random(SEED)`` where the grid
would be slow (rmlab.score); the whole module runs in about a minute.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest

from rmlab.data.formats import MAX_ABS
from rmlab.data.sources import DataError
from rmlab.data.types import DataReport
from tests.conftest import SHARED_DATA, TINY_LLAMA

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 20261205

# ----------------------------------------------------------------------------------- real records


def _first(path: Path, n: int) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def turns(text: str) -> list[dict]:
    """An HH conversation as role/content messages."""
    out = []
    for part in text.split("\n\nHuman: ")[1:]:
        human, _, assistant = part.partition("\n\nAssistant: ")
        out += [{"role": "user", "content": human}, {"role": "assistant", "content": assistant}]
    return out


class Real:
    """Real records of every shape, read once."""

    def __init__(self):
        d = SHARED_DATA
        self.hh = _first(d / "hh_rlhf_harmless" / "test.jsonl.gz", 6)
        self.pandalm = _first(d / "pandalm" / "testset-v1.jsonl", 6)
        self.prometheus = _first(d / "prometheus_absolute" / "vicuna_eval.jsonl", 6)
        alpaca = _first(d / "alpaca_eval2" / "weighted_alpaca_eval_gpt4_turbo.annotations.jsonl.gz", 2500)
        by_prompt = collections.defaultdict(list)
        for r in alpaca:  # the file is model by model: 805 prompts each, so 2,500 records give 3 per prompt
            by_prompt[r["instruction"]].append(r)
        prompts = [p for p, rs in by_prompt.items() if len(rs) >= 3][:5]
        self.alpaca_long = [r for p in prompts for r in by_prompt[p]]
        self.wide = [
            {"prompt": p, "responses": [r["output_2"] for r in by_prompt[p][:3]],
             "scores": [r["preference"] for r in by_prompt[p][:3]], "ranks": [1, 2, 3]}
            for p in prompts
        ]  # fmt: skip
        self.prompts = [turns(r["chosen"])[0]["content"] for r in self.hh]
        self.chosen = [turns(r["chosen"])[1]["content"] for r in self.hh]
        self.rejected = [turns(r["rejected"])[1]["content"] + " (b)" for r in self.hh]


@pytest.fixture(scope="module")
def real() -> Real:
    if not SHARED_DATA.exists():
        pytest.skip("needs the real datasets in ../shared/data (CI has them): the fuzz mutates real records")
    return Real()


def data_sets(real: Real) -> dict[str, tuple[str, list[dict], dict, dict]]:
    """name -> (data.format, records, data.fields, data.format_options), as conf/data/*.yaml map them."""
    pan = real.pandalm
    return {
        "implicit_prompt": ("implicit_prompt", real.hh, {}, {}),
        "pairs_labels": (
            "pairs", pan,
            {"prompt": ["instruction", "input"], "chosen": "response1", "rejected": "response2",
             "label": ["annotator1", "annotator2", "annotator3"], "subset": "motivation_app"},
            {"group_by_prompt": True},
        ),
        "pairs_margin": (
            "pairs",
            [{"prompt": r["instruction"], "chosen": r["response1"], "rejected": r["response2"] + " (b)",
              "margin": 0.5 + i, "strength": i % 4, "label": "A"} for i, r in enumerate(pan)],
            {"margin": "margin", "strength": "strength", "label": "label"}, {},
        ),
        "pairs_scores": (
            "pairs",
            [{"prompt": r["instruction"], "chosen": r["response1"], "rejected": r["response2"] + " (b)", "cs": 5,
              "rs": 2} for r in pan],
            {"chosen_score": "cs", "rejected_score": "rs"}, {},
        ),
        "ratings_long": (
            "ratings", real.alpaca_long,
            {"prompt": "instruction", "response": "output_2", "score": "preference", "subset": "dataset"},
            {"score_offset": -1.0, "max_k": 8},
        ),
        "ratings_prometheus": (
            "ratings", real.prometheus,
            {"prompt": "instruction", "response": "instruction", "score": "gpt4_score", "subset": "category",
             "critique": "gpt4_feedback"},
            {"extract": {"prompt": ["###The instruction to evaluate:", "###Response to evaluate:"],
                         "response": ["###Response to evaluate:", "###Reference Answer"]}},
        ),
        "ratings_attributes": (
            "ratings",
            [{"prompt": r["instruction"], "response": r["output_2"], "score": r["preference"], "h1": 3, "h2": [1, 2]}
             for r in real.alpaca_long],
            {"attributes": ["h1", "h2"]}, {},
        ),
        "ratings_wide": ("ratings", real.wide, {"responses": "responses", "scores": "scores"}, {}),
        "rankings": ("rankings", real.wide, {"ranks": "ranks"}, {"higher_is_better": False}),
        "rankings_in_order": ("rankings", [{k: v for k, v in w.items() if k != "ranks"} for w in real.wide], {}, {}),
        "chat": (
            "chat",
            [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": r}], "sc": 8, "sr": 3}
             for p, c, r in zip(real.prompts, real.chosen, real.rejected)],
            {"prompt": "prompt", "chosen_score": "sc", "rejected_score": "sr"}, {},
        ),
    }  # fmt: skip


# ----------------------------------------------------------------------------------- mutations

# Each value as raw JSON text, so non-standard JSON (NaN, Infinity, 1e309, 400-digit ints) lands in the file as is.
VALUES = {
    "list": "[]", "list1": '["x"]', "dict": "{}", "dict1": '{"a": 1}', "true": "true", "false": "false",
    "null": "null", "number_as_string": '"3"', "int_10^400": "1" + "0" * 400, "1e309": "1e309",
    "NaN_string": '"NaN"', "-inf_string": '"-inf"', "NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity",
    "1e30": "1e30", "1e31": "1e31", "-1": "-1", "0": "0", "7": "7", "-0.0": "-0.0", "1e-320": "1e-320",
    "fullwidth_digit": '"\\uff11"', "padded_number": '" 2 "', "digits_400_string": '"' + "9" * 400 + '"',
    "1e309_string": '"1e309"', "hex_string": '"0x10"', "underscore_number": '"1_000"',
    "list_with_NaN": "[NaN, 1]", "list_of_strings": '["a", "b"]', "mixed_list": '[1, "x", null]',
    "list_of_numbers": "[1, 2, 3]", "list_with_Infinity": "[Infinity]", "list_of_empty_strings": '["", ""]',
    "nested_100": "[" * 100 + "]" * 100, "nested_20000": "[" * 20000 + "]" * 20000,
    "empty": '""', "whitespace": '"   \\t\\n "', "zero_width_space": '"\\u200b"', "bom_char": '"\\ufeff"',
    "nbsp": '"\\u00a0"', "invisible_mix": '"\\u200b\\ufeff\\u00a0\\u2060"', "lone_surrogate": '"\\ud800"',
    "nul": '"a\\u0000b"', "nul_only": '"\\u0000"', "long_300k": json.dumps("ab " * 100_000),
}  # fmt: skip
MESSAGES = {
    "unknown_role": '[{"role": "robot", "content": "hi"}]',
    "number_role": '[{"role": 5, "content": "hi"}]',
    "no_content": '[{"role": "assistant"}]',
    "null_content": '[{"role": "assistant", "content": null}]',
    "list_content": '[{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]',
    "empty_content": '[{"role": "assistant", "content": ""}]',
    "invisible_content": '[{"role": "assistant", "content": "\\u200b "}]',
    "not_a_dict": '["hello"]',
    "no_messages": "[]",
    "user_only": '[{"role": "user", "content": "hi"}]',
    "system_only": '[{"role": "system", "content": "s"}]',
    "extra_keys": '[{"role": "assistant", "content": "hi", "name": "x", "tool_calls": [1]}]',
    "two_assistant_turns": '[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]',
    "surrogate_content": '[{"role": "assistant", "content": "\\udc00"}]',
    "empty_role": '[{"role": "", "content": "x"}]',
}
RANKINGS = {  # responses/ranks of a ranking: one response, duplicates, ties, a length mismatch
    "responses=one": ("responses", '["only one"]'),
    "responses=duplicates": ("responses", '["same", "same", "other"]'),
    "ranks=all_tied": ("ranks", "[1, 1, 1]"),
    "ranks=two_tied": ("ranks", "[1, 1, 2]"),
    "ranks=too_few": ("ranks", "[1, 2]"),
    "scores=all_equal": ("scores", "[3, 3, 3]"),
    "scores=out_of_1_5": ("scores", "[-50, 3, 900]"),
}


def with_value(rec: dict, key: str, raw: str) -> str:
    """``rec`` as JSON text with ``rec[key]`` (a new key or an existing one) replaced by the raw JSON text."""
    parts = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in rec.items() if k != key]
    return "{" + ", ".join([*parts, f"{json.dumps(key)}: {raw}"]) + "}"


def mutations(rec: dict, fields: dict, messages: bool) -> list[tuple[str, str]]:
    """(case name, one line of JSON) for every field of ``rec`` and every mapped field, and the record as a whole."""
    keys = list(rec)
    for v in fields.values():
        keys += [x for x in (v if isinstance(v, list) else [v]) if x not in keys]
    out = []
    for k in keys:
        out += [(f"{k}={name}", with_value(rec, k, raw)) for name, raw in VALUES.items()]
        if messages or (isinstance(rec.get(k), list) and rec[k] and isinstance(rec[k][0], dict)):
            out += [(f"{k}={name}", with_value(rec, k, raw)) for name, raw in MESSAGES.items()]
        if k in rec:
            body = json.dumps(rec)[1:-1]
            out += [
                (f"{k}=missing", json.dumps({a: b for a, b in rec.items() if a != k})),
                (f"{k}=duplicate_key_null_last", "{" + body + f", {json.dumps(k)}: null}}"),
                (f"{k}=duplicate_key_null_first", "{" + f"{json.dumps(k)}: null, " + body + "}"),
                (f"{k}=duplicate_key_same_value", "{" + body + f", {json.dumps(k)}: {json.dumps(rec[k])}}}"),
            ]
    for name, (k, raw) in RANKINGS.items():
        if k in rec:
            out.append((name, with_value(rec, k, raw)))
    out += [
        ("extra_field", with_value(rec, "zz_extra", '{"nested": [1, 2]}')),
        ("record=list", "[1, 2]"),
        ("record=string", '"x"'),
        ("record=number", "3"),
        ("record=null", "null"),
    ]
    return out


# ----------------------------------------------------------------------------------- the data module


@pytest.fixture(scope="module")
def tokenizer():
    from rmlab.models import build_tokenizer

    return build_tokenizer("byt5", None)


def datamodule(tokenizer, path, fmt, fields, options, on_error):
    from rmlab.data.datamodule import build_datamodule

    return build_datamodule(
        tokenizer=tokenizer, source=str(path), format=fmt, fields=fields, format_options=options, val_fraction=0.3,
        max_length=96, min_prompt_tokens=8, max_tokens=2048, on_error=on_error, cache=False,
    )  # fmt: skip


def load(tokenizer, path, fmt, fields, options, on_error):
    """The data module's own record path (``load_groups``: read_records + the format adapter), as setup runs it."""
    dm = datamodule(tokenizer, path, fmt, fields, options, on_error)
    report = DataReport()
    groups = dm.load_groups(dm.records.source, dm.records.split, report)
    return groups, report


def batches_are_finite(dm) -> int:
    """Every float a loss reads, in every train and val batch: no inf, nothing beyond 4 x MAX_ABS (a gap of two
    values in range, plus an offset); weights finite. NaN is the declared "none" of margin, score, rank."""
    import torch

    n = 0
    for b in [*dm.train_dataloader(), *dm.val_dataloader()]:
        n += b.num_comparisons
        for name in ("margin", "score", "rank", "label", "weight", "group_weight"):
            t = getattr(b, name)
            finite = t[~torch.isnan(t)]
            assert not torch.isinf(t).any() and (finite.abs() <= 4 * MAX_ABS).all(), (name, t)
        assert torch.isfinite(b.weight).all() and torch.isfinite(b.group_weight).all()
        if getattr(b, "attributes", None) is not None:
            assert not torch.isinf(b.attributes).any()
    return n


def assert_names_line(e: DataError, path: Path, line: int) -> None:
    assert re.fullmatch(re.escape(str(path)) + f":{line}( .*)?", e.where), (e.where, line)
    assert str(e).startswith(str(path)) and e.problem, str(e)
    str(e).encode("utf-8")  # printable, whatever the record held


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


SET_NAMES = [
    "implicit_prompt", "pairs_labels", "pairs_margin", "pairs_scores", "ratings_long", "ratings_prometheus",
    "ratings_attributes", "ratings_wide", "rankings", "rankings_in_order", "chat",
]  # fmt: skip
TALLY: collections.Counter = collections.Counter()  # cases tried per input kind, printed at the end


@pytest.mark.parametrize("name", SET_NAMES)
def test_every_mutated_record_is_kept_a_counted_drop_or_a_data_error_naming_its_line(real, tokenizer, tmp_path, name):
    """One file per mutation (the real records, then the mutated one): under raise, the mutated line reads or
    raises a DataError at that line; under skip, every line is accounted for, and what raised is a bad_record."""
    fmt, recs, fields, options = data_sets(real)[name]
    goods = [json.dumps(r) for r in recs]
    cases = mutations(recs[0], fields, messages=fmt == "chat")
    all_lines = list(goods)
    for case, line in cases:
        path = write_lines(tmp_path / "d.jsonl", [*goods, line])
        n = len(goods) + 1
        try:
            raised = None
            kept, r_report = load(tokenizer, path, fmt, fields, options, "raise")
        except DataError as e:
            raised = e
            assert_names_line(e, path, n)
        except Exception as e:  # pragma: no cover - the property under test
            pytest.fail(f"{name} {case}: on_error=raise let {type(e).__name__} escape: {str(e)[:300]}")
        try:
            groups, report = load(tokenizer, path, fmt, fields, options, "skip")
        except Exception as e:  # pragma: no cover
            pytest.fail(f"{name} {case}: on_error=skip raised {type(e).__name__}: {str(e)[:300]}")
        assert report.loaded == n and report.balanced, (case, report.to_dict())
        bad = sum(v for k, v in report.dropped.items() if k.startswith("bad_record: "))
        if raised is not None:
            assert bad == 1, (case, report.dropped)
        else:
            assert bad == 0 and report.to_dict() == r_report.to_dict(), (case, report.dropped)
        all_lines.append(line)
    TALLY[f"records: {name}"] += len(cases)

    # All the mutations in one file, through the whole data module under skip, as train.py runs it.
    path = write_lines(tmp_path / "all.jsonl", all_lines)
    dm = datamodule(tokenizer, path, fmt, fields, options, "skip")
    dm.setup("fit")
    tr, va = dm.report["train"], dm.report["val"]
    assert tr["balanced"] and va["balanced"], (tr, va)
    assert tr["records"]["loaded"] + va["records"]["loaded"] == len(all_lines)
    assert batches_are_finite(dm) > 0


def file_variants(recs: list[dict]) -> list[tuple[str, str, bytes | None]]:
    """(case, file name, bytes) of the records written in every container, whole and broken."""
    lines = [json.dumps(r).encode() for r in recs]
    body = b"\n".join(lines) + b"\n"
    g = gzip.compress(body)
    doc = json.dumps(recs).encode()
    flat = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in recs]
    cols = list(dict.fromkeys(k for r in flat for k in r))
    s = io.StringIO()
    w = csv.DictWriter(s, cols, lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    table = s.getvalue().encode()
    out = [
        ("jsonl", "d.jsonl", body),
        ("bom", "d.jsonl", b"\xef\xbb\xbf" + body),
        ("utf16_bom", "d.jsonl", b"\xff\xfe" + body),
        ("crlf", "d.jsonl", body.replace(b"\n", b"\r\n")),
        ("no_final_newline", "d.jsonl", body[:-1]),
        ("truncated_last_line", "d.jsonl", body[:-20]),
        ("non_utf8_line", "d.jsonl", body + b'{"prompt": "\xff\xfe"}\n'),
        ("raw_nul_in_a_string", "d.jsonl", body + lines[0].replace(b'": "', b'": "\x00', 1) + b"\n"),
        ("line_of_nul_bytes", "d.jsonl", body + b"\x00\x00\x00\n"),
        ("blank_lines_between", "d.jsonl", b"\n\n" + body.replace(b"\n", b"\n \n\t\n")),
        ("empty_file", "d.jsonl", b""),
        ("only_blank_lines", "d.jsonl", b"\n \n\t\r\n\n"),
        ("only_a_bom", "d.jsonl", b"\xef\xbb\xbf\n"),
        ("bom_inside", "d.jsonl", body + b"\xef\xbb\xbf" + lines[0] + b"\n"),
        ("two_records_on_one_line", "d.jsonl", body + lines[0] + lines[1] + b"\n"),
        ("gz", "d.jsonl.gz", g),
        ("gz_cut_in_half", "d.jsonl.gz", g[: len(g) // 2]),
        ("gz_cut_tail", "d.jsonl.gz", g[:-4]),
        ("gz_header_only", "d.jsonl.gz", g[:10]),
        ("gz_garbage_after", "d.jsonl.gz", g + b"garbage!"),
        ("gz_damaged_inside", "d.jsonl.gz", g[:30] + bytes(b ^ 0xFF for b in g[30:40]) + g[40:]),
        ("gz_not_gzip", "d.jsonl.gz", body),
        ("gzip_named_jsonl", "d.jsonl", g),
        ("gz_of_blank_lines", "d.jsonl.gz", gzip.compress(b"\n\n")),
        ("json", "d.json", doc),
        ("json_data_key", "d.json", json.dumps({"data": recs, "version": 1}).encode()),
        ("json_bom", "d.json", b"\xef\xbb\xbf" + doc),
        ("json_truncated", "d.json", doc[:-10]),
        ("json_scalar", "d.json", b"3"),
        ("json_null", "d.json", b"null"),
        ("json_empty_list", "d.json", b"[]"),
        ("json_non_utf8", "d.json", doc[:-2] + b'"\xff"]'),
        ("json_nested_50000", "d.json", b"[" * 50000 + b"]" * 50000),
        ("json_gz", "d.json.gz", gzip.compress(doc)),
        ("json_gz_cut", "d.json.gz", gzip.compress(doc)[:-30]),
        ("csv", "d.csv", table),
        ("csv_bom", "d.csv", b"\xef\xbb\xbf" + table),
        ("csv_crlf", "d.csv", table.replace(b"\n", b"\r\n")),
        ("csv_truncated", "d.csv", table[:-15]),
        ("csv_unclosed_quote", "d.csv", table + b'"abc,def\n'),
        ("csv_header_only", "d.csv", table.split(b"\n")[0] + b"\n"),
        ("csv_ragged", "d.csv", table + b"a,b,c,d,e,f,g,h,i,j,k,l,m,n\n" + b"a\n"),
        ("csv_non_utf8", "d.csv", table + b"\xff\xfe," * 3 + b"\n"),
        ("csv_nul", "d.csv", table + b"a\x00b," * 3 + b"\n"),
        ("csv_cell_of_200k", "d.csv", table + (b"x" * 200_000 + b",") * 3 + b"\n"),
        ("csv_duplicate_column", "d.csv", table.replace(b"\n", (b"," + cols[0].encode() + b"\n"), 1)),
        ("unknown_suffix", "d.txt", body),
        ("empty_folder", "", None),
    ]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(recs), buf)
        out += [("parquet", "d.parquet", buf.getvalue()), ("parquet_truncated", "d.parquet", buf.getvalue()[:-20])]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(recs)[:0], buf)
        out.append(("parquet_zero_rows", "d.parquet", buf.getvalue()))
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        pass
    return out


@pytest.mark.parametrize("name", SET_NAMES)
def test_every_broken_file_is_read_or_named(real, tokenizer, tmp_path, name):
    """Whole files, broken in every way a file breaks, through the data module's setup: raise gives the
    records or a DataError naming the file (and the line, where one is to blame); skip never raises anything
    but setup's own "no training groups left" when nothing readable is left, and its report balances."""
    fmt, recs, fields, options = data_sets(real)[name]
    for case, fname, data in file_variants(recs):
        d = tmp_path / case
        d.mkdir()
        path = d / fname if fname else d
        if data is not None:
            path.write_bytes(data)
        for on_error in ("raise", "skip"):
            dm = datamodule(tokenizer, path, fmt, fields, options, on_error)
            try:
                dm.setup("fit")
            except DataError as e:
                if e.where.startswith(f"data.source={path}"):  # nothing left to train on: the report says why
                    assert "no training groups left" in e.problem and dm.report["train"]["balanced"], (case, str(e))
                else:
                    assert on_error == "raise" and e.where.startswith(str(path)), (case, on_error, str(e))
                continue
            except Exception as e:  # pragma: no cover
                pytest.fail(f"{name} {case} on_error={on_error}: {type(e).__name__} escaped: {str(e)[:300]}")
            assert dm.report["train"]["balanced"] and dm.report["val"]["balanced"], case
            batches_are_finite(dm)
    TALLY[f"files: {name}"] += len(file_variants(recs))


def test_a_large_csv_cell_is_read_and_a_csv_error_names_its_line(tmp_path):
    """Before: a cell over the csv module's 131,072-character cap raised ``_csv.Error`` out of the loader, under
    on_error=skip too (found by the fuzz above). A long response in a CSV is data like any other."""
    from rmlab.data.formats import records_to_groups
    from rmlab.data.sources import read_records

    path = tmp_path / "d.csv"
    long = "word " * 60_000  # 300,000 characters
    path.write_text(f"prompt,chosen,rejected\np,{long},short\nq,a,b\n", encoding="utf-8")
    groups = records_to_groups(read_records(str(path)), "pairs", None, DataReport())
    assert [len(g.responses[0]) for g in groups] == [len(long), 1]


def test_csv_and_parquet_without_rows_say_the_file_has_no_records(tmp_path):
    """Before: a CSV with only its header (or a parquet file of zero rows) read as zero records without a word,
    and training stopped later at "no training groups left"; now the file is named, as for an empty jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rmlab.data.formats import records_to_groups
    from rmlab.data.sources import read_records

    (tmp_path / "h.csv").write_text("prompt,chosen,rejected\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "a", "rejected": "b"}])[:0], tmp_path / "z.parquet")
    for name in ("h.csv", "z.parquet"):
        with pytest.raises(DataError, match=re.escape(str(tmp_path / name)) + ": the file has no records"):
            records_to_groups(read_records(str(tmp_path / name)), "pairs", None, DataReport())


def test_duplicate_keys_with_different_values_are_a_data_error(tmp_path):
    """Before: ``{"chosen": "a", ..., "chosen": null}`` kept the last value silently (the first was lost). Now
    a key given twice with different values is a malformed record naming the field (nested ones too); the
    same value twice is harmless and reads; a CSV header with a column twice is refused at line 1."""
    from rmlab.data.formats import records_to_groups
    from rmlab.data.sources import read_records

    path = write_lines(tmp_path / "d.jsonl", [
        '{"prompt": "p0", "chosen": "a", "rejected": "b"}',
        '{"prompt": "p1", "chosen": "a", "rejected": "b", "chosen": "c"}',
        '{"prompt": "p2", "chosen": "a", "rejected": "b", "meta": {"x": 1, "x": 2}}',
        '{"prompt": "p3", "chosen": "a", "rejected": "b", "prompt": "p3"}',
        '{"prompt": "p4", "chosen": "a", "rejected": "b", "margin": NaN, "margin": NaN}',
    ])  # fmt: skip
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'chosen' is given twice, with different values"):
        records_to_groups(read_records(str(path)), "pairs", None, DataReport())
    report = DataReport()
    groups = records_to_groups(read_records(str(path)), "pairs", None, report, on_error="skip")
    assert [g.prompt for g in groups] == ["p0", "p3", "p4"]  # NaN twice: the same literal, no conflict
    assert report.dropped == {
        "bad_record: field 'chosen' is given twice, with different values": 1,
        "bad_record: field 'meta.x' is given twice, with different values": 1,
    }
    (tmp_path / "c.csv").write_text("prompt,chosen,rejected,chosen\np,a,b,c\n")
    with pytest.raises(DataError, match=r"c.csv:1: column 'chosen' appears more than once in the header"):
        records_to_groups(read_records(str(tmp_path / "c.csv")), "pairs", None, DataReport())
    # blank trailing columns (Excel saves those it was given) are no field given twice: the file reads as before
    (tmp_path / "x.csv").write_text("prompt,chosen,rejected,,\np,a,b,,\nq,c,d,,\n")
    groups = records_to_groups(read_records(str(tmp_path / "x.csv")), "pairs", None, DataReport())
    assert [(g.prompt, g.responses) for g in groups] == [("p", ["a", "b"]), ("q", ["c", "d"])]


# ----------------------------------------------------------------------------------- chat templates that refuse

STRICT_TEMPLATE = (  # the rule Mistral's and Gemma's templates enforce with raise_exception, written here
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def strict_tokenizer():
    from rmlab.models import build_tokenizer

    tok = build_tokenizer("byt5", None)
    tok.chat_template = STRICT_TEMPLATE
    return tok


def test_a_chat_template_that_refuses_the_messages_is_a_data_error_or_a_counted_drop(real, strict_tokenizer, tmp_path):
    """Before: the template's own ``raise_exception`` escaped as ``jinja2.TemplateError`` from the chat format,
    under on_error=skip too, with no file or line. Now it is a DataError at the record's line."""
    good = [
        {"chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
         "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
        for p, c, r in zip(real.prompts, real.chosen, real.rejected)
    ]  # fmt: skip
    bad = {"chosen": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "b"}]}  # fmt: skip
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in [*good, bad]])
    with pytest.raises(DataError) as err:
        datamodule(strict_tokenizer, path, "chat", {}, {}, "raise").setup("fit")
    assert_names_line(err.value, path, len(good) + 1)
    assert "chat template refused the messages (roles: assistant, assistant)" in err.value.problem
    assert "Conversation roles must alternate" in err.value.problem
    dm = datamodule(strict_tokenizer, path, "chat", {}, {}, "skip")
    dm.setup("fit")
    dropped = collections.Counter(dm.report["train"]["records"]["dropped"]) + collections.Counter(
        dm.report["val"]["records"]["dropped"]
    )
    assert dropped["bad_record: the chat template refused the messages"] == 1


# ----------------------------------------------------------------------------------- benchmarks (eval.py benchmark=)


@pytest.fixture(scope="module")
def scorer():
    import torch

    from rmlab.models import build_model
    from rmlab.score import Scorer

    torch.manual_seed(0)
    return Scorer(build_model(config=TINY_LLAMA, tokenizer="byt5").eval(), max_length=48, min_prompt_tokens=8)


def benchmark_rows(real: Real) -> dict[str, tuple[object, list[dict], str]]:
    from rmlab.benchmarks import rewardbench, rewardbench2, rm_bench

    P, C, R = real.prompts, real.chosen, real.rejected
    rb1 = [{"prompt": P[i], "chosen": C[i], "chosen_model": "m", "rejected": R[i], "rejected_model": "n",
            "subset": "alpacaeval-easy", "id": 1000 + i} for i in range(3)]  # fmt: skip
    rb2 = [
        {"id": "0", "prompt": P[0], "chosen": [C[0]], "rejected": [R[0], R[1], R[2]], "num_correct": 1,
         "subset": "Factuality"},
        {"id": "ref:1", "prompt": P[3], "chosen": [C[3]], "rejected": [R[3]], "num_correct": 1, "subset": "Ties"},
        {"id": "tied:1", "prompt": P[3], "chosen": [C[3], C[4]], "rejected": [R[3]], "num_correct": 2,
         "subset": "Ties"},
    ]  # fmt: skip
    rmb = [{"id": i, "prompt": P[i], "chosen": [C[i], C[i] + " more", "## " + C[i]],
            "rejected": [R[i], R[i] + " more", "## " + R[i]], "domain": d}
           for i, d in enumerate(["chat", "math", "code", "safety-refuse"])]  # fmt: skip
    prior = [{"prompt": turns(r["chosen"])[:1], "chosen": C[i], "rejected": R[i], "subset": "anthropic_helpful"}
             for i, r in enumerate(real.hh[:3])]  # fmt: skip
    return {
        "rewardbench": (rewardbench, rb1, "jsonl"),
        "rewardbench2": (rewardbench2, rb2, "jsonl"),
        "rm_bench": (rm_bench, rmb, "json"),
        "rewardbench_prior_sets": (rewardbench, prior, "json"),
    }


def bench_score(mod, items, prior: bool):
    """The benchmark's rules over per-response rewards (made up here, seeded: the rules must take any floats)."""
    rng = random.Random(SEED)
    rewards = [[rng.uniform(-3, 3) for _ in it.responses] for it in items]
    if mod.__name__.endswith(".rewardbench"):
        return mod.score(items, rewards, with_prior=prior)
    return mod.score(items, rewards)


@pytest.mark.parametrize("name", ["rewardbench", "rewardbench2", "rm_bench", "rewardbench_prior_sets"])
def test_every_mutated_benchmark_row_loads_and_scores_or_names_its_row(real, scorer, tmp_path, name):
    """Each row of a benchmark file mutated field by field: the loader (``BENCHMARKS[name].load``, as eval.py
    benchmark=... calls it) reads it, and the benchmark's rules score it, or a DataError names the file and the
    row. The items that load are then scored for real through ``rmlab.score.Scorer`` (the eval path), once."""
    from omegaconf import OmegaConf

    mod, rows, kind = benchmark_rows(real)[name]
    prior = name.endswith("prior_sets")
    main = write_lines(tmp_path / "rb.jsonl", [json.dumps(r) for r in benchmark_rows(real)["rewardbench"][1]])
    loaded, n = [], 0
    for i, base in enumerate(rows):
        others = [json.dumps(r) for j, r in enumerate(rows) if j != i]
        for case, line in mutations(base, {}, messages=prior):
            n += 1
            if kind == "jsonl":
                path = write_lines(tmp_path / "b.jsonl", [*others, line])
                where = rf"{re.escape(str(path))}:{len(rows)}"
            else:  # a .json list; RM-Bench reads a domain from a per-domain file's name
                path = tmp_path / "chat_b.json"
                path.write_text("[" + ",".join([*others, line]) + "]")
                where = rf"{re.escape(str(path))}:record {len(rows) - 1}"
            cfg = {"source": str(main if prior else path), "split": "x", "prior_sets": str(path) if prior else None}
            try:
                items, _ = mod.load(OmegaConf.create(cfg))
                bench_score(mod, items, prior)
            except DataError as e:
                # A .json document nested past the decoder's depth has no parse position: the file is named.
                whole = kind == "json" and e.where == str(path) and "nested too deeply" in e.problem
                assert whole or re.fullmatch(where + "( .*)?", e.where), (name, case, e.where)
                continue
            except Exception as e:  # pragma: no cover
                pytest.fail(f"{name} row {i} {case}: {type(e).__name__} escaped: {str(e)[:300]}")
            loaded += items if len(loaded) < 400 else []
    TALLY[f"benchmark rows: {name}"] += n
    rng = random.Random(SEED)
    sample = rng.sample(loaded, min(60, len(loaded)))  # the real scoring path, on a seeded sample of what loaded
    from rmlab.benchmarks.common import score_items

    rewards = score_items(scorer, sample, progress=False)
    assert all(math.isfinite(r) for rs in rewards for r in rs)


def test_benchmark_rows_found_by_the_fuzz(real, tmp_path):
    """The escapes the fuzz found, as plain cases. Before the fixes: a RewardBench row that is not an object
    raised AttributeError; RewardBench 2 took ``num_correct: true`` as 1, and a ``tied:<n>`` row with one correct
    answer (or an id like ``tied:²``, which isdigit() accepts and int() refuses) loaded and then failed after
    every response had been scored, with a bare ValueError naming no row."""
    from omegaconf import OmegaConf

    from rmlab.benchmarks import rewardbench, rewardbench2

    rows = benchmark_rows(real)
    path = write_lines(tmp_path / "rb.jsonl", [json.dumps(r) for r in rows["rewardbench"][1]] + ["[1, 2]"])
    with pytest.raises(DataError, match=r"rb.jsonl:4: a row must be an object, got list"):
        rewardbench.load(OmegaConf.create({"source": str(path), "split": "x", "prior_sets": None}))
    rb2 = rows["rewardbench2"][1]
    for change, message in [
        ({"num_correct": True}, r"field 'num_correct' must be an integer"),
        ({"num_correct": 1}, r"a tied:<n> Ties row needs 2 or more correct answers"),
        ({"id": "tied:²"}, r"a Ties row's id must be ref:<n> or tied:<n>, got 'tied:²'"),
    ]:
        path = write_lines(
            tmp_path / "rb2.jsonl", [json.dumps(r) for r in rb2[:2]] + [json.dumps({**rb2[2], **change})]
        )
        with pytest.raises(DataError, match=r"rb2.jsonl:3: " + message):
            rewardbench2.load(OmegaConf.create({"source": str(path), "split": "x"}))


def test_a_refusing_chat_template_in_benchmark_scoring_names_the_row(real, tmp_path):
    """A benchmark row whose conversation the tokenizer's template refuses: before, jinja2.TemplateError out of
    the scorer after the rows loaded; now a DataError naming the row, from ``score_items`` (eval.py's scoring
    path). The template here refuses a marker in a message, the way templates refuse what they do not take."""
    import torch
    from omegaconf import OmegaConf

    from rmlab.benchmarks import rewardbench
    from rmlab.benchmarks.common import score_items
    from rmlab.models import build_model
    from rmlab.score import Scorer

    torch.manual_seed(0)
    model = build_model(config=TINY_LLAMA, tokenizer="byt5").eval()
    model.tokenizer.chat_template = (
        "{% for m in messages %}{% if '<tool_call>' in m['content'] %}"
        "{{ raise_exception('tool calls need the tools argument') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rows = [*benchmark_rows(real)["rewardbench"][1]]
    rows[1] = {**rows[1], "rejected": "<tool_call>search()"}
    path = write_lines(tmp_path / "rb.jsonl", [json.dumps(r) for r in rows])
    items, _ = rewardbench.load(OmegaConf.create({"source": str(path), "split": "x", "prior_sets": None}))
    with pytest.raises(DataError) as err:
        score_items(Scorer(model, max_length=48, min_prompt_tokens=8), items, progress=False)
    assert err.value.where == f"{path}:2", err.value.where
    assert "chat template refused the messages (roles: user, assistant)" in err.value.problem
    assert "tool calls need the tools argument" in err.value.problem


# ----------------------------------------------------------------------------------- rmlab.score


@pytest.mark.parametrize("shape", ["text_single", "text_pair", "messages", "chat_pair", "trl"])
def test_every_mutated_record_through_rmlab_score_is_scored_or_names_its_line(real, scorer, tmp_path, shape):
    """``rmlab.score.score_file`` (what ``python -m rmlab.score`` runs) on each record shape it reads, mutated
    field by field (a seeded sample of the grid, for time): every record is written with finite rewards, or a
    DataError names the file and the mutated line."""
    from rmlab.score import score_file

    P, C, R = real.prompts, real.chosen, real.rejected
    msgs = [turns(r["chosen"]) for r in real.hh]
    rows = {
        "text_single": [{"prompt": P[i], "response": C[i]} for i in range(2)],
        "text_pair": [{"prompt": P[i], "chosen": C[i], "rejected": R[i]} for i in range(2)],
        "messages": [{"messages": msgs[i]} for i in range(2)],
        "chat_pair": [{"prompt": P[i], "chosen": [{"role": "assistant", "content": C[i]}],
                       "rejected": [{"role": "assistant", "content": R[i]}]} for i in range(2)],
        "trl": [{"prompt": [{"role": "user", "content": P[i]}],
                 "completion": [{"role": "assistant", "content": C[i]}]} for i in range(2)],
    }[shape]  # fmt: skip
    cases = mutations(rows[0], {}, messages=True)
    cases = random.Random(f"{SEED}-{shape}").sample(cases, min(80, len(cases)))
    for case, line in cases:
        src = write_lines(tmp_path / "in.jsonl", [json.dumps(rows[1]), line])
        dst = tmp_path / "out.jsonl"
        try:
            n = score_file(scorer, str(src), str(dst), buffer=4, progress=False)
        except DataError as e:
            assert_names_line(e, src, 2)
            continue
        except Exception as e:  # pragma: no cover
            pytest.fail(f"{shape} {case}: {type(e).__name__} escaped rmlab.score: {str(e)[:300]}")
        out = [json.loads(x) for x in dst.read_text().splitlines()]
        assert n == len(out) == 2, case
        for o in out:
            assert all(
                math.isfinite(o[k]) for k in ("reward", "reward_chosen", "reward_rejected", "p_chosen") if k in o
            )
    TALLY[f"rmlab.score: {shape}"] += len(cases)


# ----------------------------------------------------------------------------------- exports and tokenized caches


def test_every_broken_export_is_a_checkpoint_error_naming_the_file(tmp_path):
    """An export dir (what eval.py model.name_or_path= and rmlab.score --model load) with one file damaged:
    ``load_member`` raises a CheckpointError naming the file, before transformers reads it. Before: a config.json
    that is not an object, a non-object rmlab record, JSON nested past the decoder, a safetensors header that is
    a list or has infinite offsets, an index whose weight_map is a list, a cut tokenizer_config.json: TypeError,
    AttributeError, RecursionError, OverflowError or a JSONDecodeError naming no file."""
    import torch

    from rmlab.checkpoint import CheckpointError
    from rmlab.evaluate import load_member
    from rmlab.models import build_model

    torch.manual_seed(0)
    out = build_model(config=TINY_LLAMA, tokenizer="byt5").eval().save_pretrained(tmp_path / "export")
    W = (out / "model.safetensors").read_bytes()
    C = json.loads((out / "config.json").read_text())
    n = int.from_bytes(W[:8], "little")

    def sf(header: bytes) -> bytes:
        return len(header).to_bytes(8, "little") + header + W[8 + n :]

    tensor = {"dtype": "F32", "shape": [1]}
    cases = [(f"config.json cut at {f}", "config.json", json.dumps(C).encode()[: int(len(json.dumps(C)) * f)])
             for f in (0, 0.1, 0.5, 0.9)]  # fmt: skip
    cases += [(f"weights cut at {f}", "model.safetensors", W[: int(len(W) * f)]) for f in (0, 0.001, 0.5, 0.999)]
    cases += [
        ("config.json not UTF-8", "config.json", b"\xff" + json.dumps(C).encode()),
        ("config.json a list", "config.json", b"[]"),
        ("config.json null", "config.json", b"null"),
        ("rmlab record a string", "config.json", json.dumps({**C, "rmlab": "x"}).encode()),
        ("rmlab head a number", "config.json", json.dumps({**C, "rmlab": {**C.get("rmlab", {}), "head": 5}}).encode()),
        ("config.json nested 100000", "config.json", b"[" * 100_000 + b"]" * 100_000),
        ("safetensors header a list", "model.safetensors", sf(b"[]")),
        ("safetensors header a string", "model.safetensors", sf(b'"x"')),
        ("safetensors infinite offset", "model.safetensors",
         sf(json.dumps({"w": {**tensor, "data_offsets": [0, float("inf")]}}).encode())),
        ("safetensors offsets a string", "model.safetensors", sf(json.dumps({"w": {**tensor, "data_offsets": "ab"}}).encode())),
        ("safetensors header nested", "model.safetensors", sf(b"[" * 100_000 + b"]" * 100_000)),
        ("safetensors header not UTF-8", "model.safetensors", sf(b"\xff\xfe")),
        ("safetensors header length huge", "model.safetensors", (2**63).to_bytes(8, "little") + W[8:]),
        ("tokenizer_config.json cut", "tokenizer_config.json", b'{"a": '),
        ("index not JSON", "model.safetensors.index.json", b"{]"),
        ("index weight_map a list", "model.safetensors.index.json", b'{"weight_map": ["x"]}'),
        ("index names a missing shard", "model.safetensors.index.json", b'{"weight_map": {"a": "gone.safetensors"}}'),
        ("config.json removed", "config.json", None),
        ("weights removed", "model.safetensors", None),
    ]  # fmt: skip
    for case, name, data in cases:
        d = tmp_path / "broken"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(out, d)
        if data is None:
            (d / name).unlink()
        else:
            (d / name).write_bytes(data)
        try:
            load_member(str(d))
        except CheckpointError as e:
            assert str(d) in str(e) and "export again" in str(e), (case, str(e))
            continue
        except Exception as e:  # pragma: no cover
            pytest.fail(f"{case}: {type(e).__name__} escaped: {str(e)[:300]}")
        pytest.fail(f"{case}: the damaged export loaded")
    TALLY["exports"] += len(cases)


def test_a_damaged_tokenized_cache_is_rebuilt(tokenizer, tmp_path, monkeypatch):
    """The tokenized cache ($RMLAB_CACHE) cut, overwritten or of another shape: setup rebuilds it and gets the
    same groups. Before: a torch file whose report lacked ``n_train_groups`` raised KeyError out of setup."""
    import torch

    from rmlab.data.tokenize import cache_dir

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": f"p{i}", "chosen": f"good {i}",
                                                          "rejected": f"bad {i}"}) for i in range(20)])  # fmt: skip

    def build():
        from rmlab.data.datamodule import build_datamodule

        dm = build_datamodule(tokenizer=tokenizer, source=str(path), max_length=64, min_prompt_tokens=4, cache=True)
        dm.setup("fit")
        return [g.response_ids for g in dm.train_groups]

    want = build()
    (cache,) = cache_dir().glob("*.pt")
    whole = cache.read_bytes()

    def saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    cases = {f"cut at {f}": whole[: int(len(whole) * f)] for f in (0, 0.01, 0.5, 0.999)}
    cases |= {
        "bytes flipped": whole[:200] + bytes(b ^ 0xFF for b in whole[200:400]) + whole[400:],
        "a list": saved([1, 2]),
        "a report without its keys": saved({"groups": [], "report": {}}),
        "a report that is a list": saved({"groups": [], "report": []}),
        "groups of another shape": saved({"groups": [{"x": 1}], "report": {"n_train_groups": 1, "one_line": []}}),
    }
    for case, data in cases.items():
        cache.write_bytes(data)
        assert build() == want, case
    TALLY["tokenized caches"] += len(cases)


def test_zz_report_the_cases_tried():
    """Prints the number of cases per input kind (``pytest -s`` shows it); runs last in the module."""
    if TALLY:
        print("\nfuzz cases tried: " + ", ".join(f"{k}={v}" for k, v in sorted(TALLY.items())))
    assert all(v > 0 for v in TALLY.values())
