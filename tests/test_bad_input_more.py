"""Bad input that used to escape the clear-error path (issue 19, the data side).

Deep nesting, lone surrogates, numbers that are not finite (or so large their gap overflows), a file of
blank lines given to ``rmlab.score``, a ``.gz`` that is not gzip, an empty folder: each is now a
``DataError`` naming file, line and field (what to do next in its hint), or under ``data.on_error=skip``
a counted drop with a named reason, and ``loaded = kept + dropped`` holds throughout.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rmlab.data.formats import MAX_ABS, records_to_groups
from rmlab.data.sources import MAX_DEPTH, DataError, read_records
from rmlab.data.types import DataReport

GOOD = {"prompt": "p0", "chosen": "good", "rejected": "bad"}


def jl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def write(tmp_path: Path, name: str, body: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(body)
    return str(p)


def load(path, fmt="pairs", fields=None, on_error="raise", **options):
    report = DataReport()
    groups = records_to_groups(read_records(path), fmt, fields, report, on_error=on_error, **options)
    assert report.balanced, report.to_dict()
    assert report.kept == sum(g.n_records for g in groups)
    return groups, report


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


# ---------------------------------------------------------------- 1. deep nesting


@pytest.mark.parametrize(
    "body, problem",
    [
        (deep(10_000), "the JSON is nested too deeply to read"),  # beyond the decoder's recursion limit
        (b'{"prompt": ' + deep(MAX_DEPTH + 5) + b', "chosen": "a", "rejected": "b"}', "nested more than 64 levels"),
    ],
    ids=["10k_arrays", "past_max_depth"],
)
def test_deep_nesting_is_a_clear_error_or_a_counted_skip(tmp_path, body, problem):
    path = write(tmp_path, "d.jsonl", jl(GOOD) + body + b"\n" + jl({**GOOD, "prompt": "p2"}))
    with pytest.raises(DataError) as e:
        load(path)
    assert e.value.where == f"{path}:2" and problem in e.value.problem and "data.on_error=skip" in e.value.hint
    groups, report = load(path, on_error="skip")
    assert [g.prompt for g in groups] == ["p0", "p2"]
    assert report.loaded == 3 and sum(report.dropped.values()) == 1
    (reason,) = report.dropped
    assert reason.startswith("bad_record: ") and ("nested" in reason)


def test_deep_nesting_in_a_json_document(tmp_path):
    path = write(tmp_path, "d.json", deep(10_000))
    with pytest.raises(DataError, match="nested too deeply") as e:
        load(path)
    assert e.value.where == path


def test_a_deep_value_handed_to_an_adapter_directly_is_a_data_error():
    """The adapters do not recurse into values either: a score that is a list of lists is not a number."""
    v: list = []
    for _ in range(5000):
        v = [v]
    rec = {"prompt": "p", "response": "a", "score": v}
    with pytest.raises(DataError, match=r"f.jsonl:7: field 'score' = .* is not a number"):
        records_to_groups([("f.jsonl:7", rec)], "ratings", None, DataReport())
    rec = {**GOOD, "w": v}
    with pytest.raises(DataError, match=r"label 'w' = .* is a list, not a label"):
        records_to_groups([("f.jsonl:7", rec)], "pairs", {"label": "w"}, DataReport())


def test_deep_nesting_through_rmlab_score(tmp_path):
    from rmlab.score import score_file

    src = write(tmp_path, "s.jsonl", jl({"prompt": "p", "response": "r"}) + deep(10_000) + b"\n")
    with pytest.raises(DataError, match="s.jsonl:2: the JSON is nested too deeply"):
        score_file(_NeverCalled(), src, str(tmp_path / "o.jsonl"), progress=False)


class _NeverCalled:
    """A scorer for paths that must fail before any scoring."""

    kind, attribute_names = "scalar", []

    def rows(self, items):
        raise AssertionError("nothing should be scored")


# ---------------------------------------------------------------- 2. lone surrogates (and NUL)

SURROGATE_CASES = [
    ("pairs", None, {"prompt": "q\ud800\x00", "chosen": "a", "rejected": "b"}, "prompt"),
    ("pairs", None, {"prompt": "q", "chosen": "a", "rejected": "b\udfff"}, "rejected"),
    (
        "implicit_prompt",
        None,
        {"chosen": "\n\nHuman: hi\n\nAssistant: \ud800", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
        "chosen",
    ),
    ("ratings", None, {"prompt": "q", "response": "a\ud800", "score": 1}, "response"),
    ("rankings", None, {"prompt": "q", "responses": ["a", "b\udc00"]}, "responses[1]"),
    (
        "chat",
        None,
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\ud800"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        },
        "chosen[1].content",
    ),
    ("pairs", None, {**GOOD, "note": "unused field \ud800"}, "note"),  # any field: the record cannot be written back
]


@pytest.mark.parametrize("fmt, fields, bad, field", SURROGATE_CASES, ids=[f"{c[0]}-{c[3]}" for c in SURROGATE_CASES])
def test_a_lone_surrogate_is_a_malformed_record(tmp_path, fmt, fields, bad, field):
    good = {
        "pairs": GOOD,
        "implicit_prompt": {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b"},
        "ratings": {"prompt": "q", "response": "z", "score": 2},
        "rankings": {"prompt": "p", "responses": ["a", "b"]},
        "chat": {
            "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}],
        },
    }[fmt]
    path = write(tmp_path, "d.jsonl", jl(good, bad))  # json.dumps escapes the surrogate as \udXXX
    with pytest.raises(DataError) as e:
        load(path, fmt, fields)
    assert e.value.where == f"{path}:2"
    assert e.value.problem.startswith(f"field {field!r} holds a lone surrogate"), e.value.problem
    assert "not valid Unicode text" in e.value.problem and "data.on_error=skip" in e.value.hint
    str(e.value).encode("utf-8")  # the message itself can be printed
    groups, report = load(path, fmt, fields, on_error="skip")
    assert report.loaded == 2 and report.dropped[f"bad_record: field {field!r} holds a lone surrogate"] == 1
    if fmt == "ratings":  # the good record's prompt is left with one response
        assert report.kept == 0 and report.dropped["single_response_prompt"] == 1
    else:
        assert report.kept == 1 and len(report.dropped) == 1


def test_nul_and_surrogate_pairs_are_legal_text(tmp_path):
    path = write(
        tmp_path,
        "d.jsonl",
        # json.dumps writes the astral character as an escaped surrogate pair: legal, read back as one character
        jl({"prompt": "a\x00b", "chosen": "smile \U0001f600", "rejected": "nul \x00"}),
    )
    (g,), report = load(path)
    assert g.prompt == "a\x00b" and g.responses == ["smile \U0001f600", "nul \x00"] and report.kept == 1


def test_a_surrogate_in_a_field_name_is_malformed(tmp_path):
    path = write(tmp_path, "d.jsonl", jl({**GOOD, "k\ud800": 1}))
    with pytest.raises(DataError, match=r"field name 'k\\ud800' holds a lone surrogate"):
        load(path)


def test_the_adapters_refuse_a_surrogate_in_records_built_in_code():
    with pytest.raises(DataError, match=r"here:3: field 'chosen' holds a lone surrogate \('\\ud800' at character 1\)"):
        records_to_groups([("here:3", {**GOOD, "chosen": "a\ud800"})], "pairs", None, DataReport())


def test_in_val_hashes_any_text_and_keeps_the_split_of_valid_text():
    import hashlib

    from rmlab.data.datamodule import in_val

    assert in_val("q\ud800\x00", 0.5, 0) in (True, False)  # raised UnicodeEncodeError before
    for p in ["plain", "café", "a\x00b", "\U0001f600"]:  # valid text: the same split as the plain utf-8 hash
        h = int(hashlib.sha1(f"3\x00{p}".encode()).hexdigest()[:8], 16)
        assert in_val(p, 0.37, 3) == ((h % 100_000) < 0.37 * 100_000)


def test_a_surrogate_record_through_the_datamodule_is_a_counted_skip(tmp_path, monkeypatch):
    from rmlab.data.datamodule import build_datamodule
    from rmlab.models import build_tokenizer

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    rows[3]["prompt"] = "p3\ud800\x00"
    src = write(tmp_path, "d.jsonl", jl(*rows))
    dm = build_datamodule(
        tokenizer=build_tokenizer("byt5", None), source=src, val_fraction=0.3, max_length=64, on_error="skip"
    )
    dm.setup("fit")
    tr, va = dm.report["train"]["records"], dm.report["val"]["records"]
    assert tr["loaded"] + va["loaded"] == 6 and tr["kept"] + va["kept"] == 5
    assert tr["dropped"] == {"bad_record: field 'prompt' holds a lone surrogate": 1}
    dm_raise = build_datamodule(tokenizer=build_tokenizer("byt5", None), source=src, max_length=64, cache=False)
    with pytest.raises(DataError, match=r"d.jsonl:4: field 'prompt' holds a lone surrogate"):
        dm_raise.setup("fit")


def test_a_surrogate_through_rmlab_score_names_file_line_and_field(tiny_llama, tmp_path):
    from rmlab.score import Scorer, score_file

    src = write(tmp_path, "s.jsonl", jl({"prompt": "p", "response": "r"}, {"prompt": "p", "response": "x\ud800\x00"}))
    with pytest.raises(DataError, match=r"s.jsonl:2: field 'response' holds a lone surrogate"):
        score_file(Scorer(tiny_llama, max_length=64), src, str(tmp_path / "o.jsonl"), progress=False)


# ---------------------------------------------------------------- 3. numbers that are not finite

HUGE_INT = 10**400  # json writes all 401 digits; float() of it overflows

# (format, fields, the bad record's numeric fields, the drop reason); every bad record is dropped under
# both on_error modes: these are documented drops, not errors.
NONFINITE = [
    ("pairs", {"margin": "m"}, {"m": 1e308}, "nonfinite_margin"),
    ("pairs", {"margin": "m"}, {"m": "inf"}, "nonfinite_margin"),
    ("pairs", {"margin": "m"}, {"m": float("nan")}, "nonfinite_margin"),
    ("pairs", {"margin": "m"}, {"m": "-Infinity"}, "nonfinite_margin"),
    ("pairs", {"margin": "m"}, {"m": 2 * MAX_ABS}, "nonfinite_margin"),
    ("pairs", {"margin": "m"}, {"m": HUGE_INT}, "nonfinite_margin"),
    ("implicit_prompt", {"margin": "m"}, {"m": "1e309"}, "nonfinite_margin"),
    ("pairs", {"chosen_score": "c", "rejected_score": "r"}, {"c": "inf", "r": 1}, "nonfinite_score"),
    ("pairs", {"chosen_score": "c", "rejected_score": "r"}, {"c": float("inf"), "r": 1}, "nonfinite_score"),
    ("pairs", {"chosen_score": "c", "rejected_score": "r"}, {"c": 1e308, "r": -1e308}, "nonfinite_score"),
    ("pairs", {"chosen_score": "c", "rejected_score": "r"}, {"c": 1, "r": -1e308}, "nonfinite_score"),
    ("pairs", {"chosen_score": "c", "rejected_score": "r"}, {"c": 1, "r": float("nan")}, "nonfinite_score"),
    ("chat", {"chosen_score": "c", "rejected_score": "r"}, {"c": 1e308, "r": 0}, "nonfinite_score"),
    ("ratings", None, {"score": 1e308}, "nonfinite_score"),
    ("ratings", None, {"score": "-inf"}, "nonfinite_score"),
    ("ratings", None, {"score": [1, float("inf")]}, "nonfinite_score"),
    ("ratings", None, {"score": [1e308, 1e308]}, "nonfinite_score"),  # the mean's sum overflowed (OverflowError)
    ("ratings", None, {"score": [float("inf"), float("-inf")]}, "nonfinite_score"),  # fsum raised ValueError
    ("ratings", None, {"score": HUGE_INT}, "nonfinite_score"),
    ("rankings", {"ranks": "rk"}, {"rk": [float("nan"), 1]}, "nonfinite_rank"),
    ("rankings", {"ranks": "rk"}, {"rk": [1, "inf"]}, "nonfinite_rank"),
]

BASE = {
    "pairs": {"prompt": "q", "chosen": "a", "rejected": "b"},
    "implicit_prompt": {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
    "chat": {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    },
    "ratings": {"prompt": "q", "response": "a"},
    "rankings": {"prompt": "q", "responses": ["a", "b"]},
}
FINE = {
    "pairs": {"m": 2.5, "c": 3, "r": 0.5},
    "implicit_prompt": {"m": 2.5},
    "chat": {"c": 3, "r": 0.5},
    "ratings": {"score": 2.5},
    "rankings": {"rk": [2, 1]},
}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("fmt, fields, bad, reason", NONFINITE, ids=[f"{c[0]}-{i}" for i, c in enumerate(NONFINITE)])
def test_a_nonfinite_number_is_a_counted_drop(tmp_path, fmt, fields, bad, reason, on_error):
    def rec(i, nums):
        r = json.loads(json.dumps(BASE[fmt]))
        if fmt == "implicit_prompt":
            r = {k: v.replace("q", f"q{i}") for k, v in r.items()}
        elif fmt == "chat":
            for side in ("chosen", "rejected"):
                r[side][0]["content"] = f"q{i}"
        else:
            r["prompt"] = f"q{i}"
        return {**r, **nums}

    if fmt == "ratings":  # one response per record: a prompt needs two kept responses to make a group
        rows = [rec(0, FINE[fmt]), {**rec(0, FINE[fmt]), "response": "z", "score": 1}, {**rec(1, bad), "response": "y"}]
    else:
        rows = [rec(0, FINE[fmt]), rec(1, bad)]
    path = write(tmp_path, "d.jsonl", jl(*rows))
    groups, report = load(path, fmt, fields, on_error=on_error)
    assert dict(report.dropped) == {reason: 1} and report.loaded == len(rows)
    assert len(groups) == 1 and report.kept == len(rows) - 1  # the fine record's group
    # what is kept carries only finite values
    for g in groups:
        assert all(c.margin is None or in_float32(c.margin) for c in g.comparisons)
        assert all(in_float32(s) for s in g.scores or [])
        assert all(in_float32(r) for r in g.ranks or [])


def in_float32(x: float) -> bool:
    import numpy as np

    return bool(np.isfinite(np.float32(x)))


def test_values_at_the_limit_are_kept_and_stay_finite_in_float32(tmp_path):
    rows = [
        {**GOOD, "c": MAX_ABS, "r": -MAX_ABS},  # the gap, 2e30, is finite in float32
        {**GOOD, "prompt": "p1", "c": 0.25, "r": "-0.5"},
    ]
    groups, report = load(write(tmp_path, "d.jsonl", jl(*rows)), "pairs", {"chosen_score": "c", "rejected_score": "r"})
    assert [g.comparisons[0].margin for g in groups] == [2 * MAX_ABS, 0.75] and not report.dropped


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e308])
def test_a_nonfinite_attribute_rating_is_still_a_data_error(tmp_path, value):
    """Attribute ratings keep their documented policy: a DataError (a counted bad_record under skip)."""
    rows = [{"prompt": "q", "response": "a", "s": 1, "h": 3}, {"prompt": "q", "response": "b", "s": 2, "h": value}]
    path = write(tmp_path, "d.jsonl", jl(*rows))
    with pytest.raises(DataError, match=r"d.jsonl:2: attribute field 'h' = .* is not finite"):
        load(path, "ratings", {"score": "s", "attributes": ["h"]})
    _, report = load(path, "ratings", {"score": "s", "attributes": ["h"]}, on_error="skip")
    assert dict(report.dropped) == {"bad_record: attribute field 'h'": 1, "single_response_prompt": 1}


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "Infinity", 1e308])
def test_a_nonfinite_strength_is_still_a_data_error(tmp_path, value):
    path = write(tmp_path, "d.jsonl", jl({**GOOD, "s": 1}, {**GOOD, "prompt": "p1", "s": value}))
    with pytest.raises(DataError, match=r"d.jsonl:2: field 's' = .* is not a strength 0..3"):
        load(path, "pairs", {"strength": "s"})


@pytest.mark.parametrize("option", ["score_offset", "tie_eps"])
def test_a_nonfinite_format_option_is_refused(tmp_path, option):
    path = write(tmp_path, "d.jsonl", jl({"prompt": "q", "response": "a", "score": 1}))
    with pytest.raises(ValueError, match=f"data.format_options.{option}=inf must be a finite number"):
        load(path, "ratings", **{option: float("inf")})


def _batches_of(dm):
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        yield from loader


@pytest.mark.parametrize(
    "fmt, fields, rows_fn",
    [
        ("pairs", {"margin": "m", "strength": "st"}, "margins"),
        ("pairs", {"chosen_score": "c", "rejected_score": "r"}, "scores"),
        ("ratings", None, "ratings"),
    ],
    ids=["margin", "chosen_score", "ratings"],
)
def test_nonfinite_values_never_reach_a_batch(tmp_path, monkeypatch, fmt, fields, rows_fn):
    """Build the datamodule on a file full of non-finite numbers: every batch tensor a loss reads is finite
    (margin: every kept record gave one, so no NaN "none" either; weight; score of rated responses)."""
    import torch

    from rmlab.data.datamodule import build_datamodule
    from rmlab.models import build_tokenizer

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    bad_values = [1e308, -1e308, "inf", "-inf", "NaN", float("nan"), float("inf"), 1e31, HUGE_INT]
    rows, n_bad = [], 0
    for i in range(24):
        v = bad_values[i % len(bad_values)] if i % 2 else (i - 12) * 0.5 + 0.25
        bad = i % 2 == 1
        n_bad += bad
        if rows_fn == "margins":
            rows.append({"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "m": v, "st": i % 4})
        elif rows_fn == "scores":
            rows.append({"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "c": v, "r": -1e29})
        else:
            rows.append({"prompt": f"p{i // 3}", "response": f"answer {i}", "score": v})
    src = write(tmp_path, "d.jsonl", jl(*rows))
    dm = build_datamodule(
        tokenizer=build_tokenizer("byt5", None),
        source=src,
        format=fmt,
        fields=fields,
        val_fraction=0.25,
        max_length=64,
        cache=False,
    )
    dm.setup("fit")
    reason = {"margins": "nonfinite_margin", "scores": "nonfinite_score", "ratings": "nonfinite_score"}[rows_fn]
    tr, va = dm.report["train"]["records"], dm.report["val"]["records"]
    assert tr["loaded"] + va["loaded"] == 24
    assert tr["dropped"].get(reason, 0) + va["dropped"].get(reason, 0) == n_bad
    n = 0
    for b in _batches_of(dm):
        n += b.num_comparisons
        assert torch.isfinite(b.weight).all() and torch.isfinite(b.group_weight).all()
        if rows_fn == "ratings":
            assert torch.isfinite(b.score).all() and torch.isfinite(b.margin).all()
        else:
            assert torch.isfinite(b.margin).all(), b.margin  # every kept record gave a margin: no "none"
            assert not torch.isinf(b.score).any()  # NaN = none (pairs carry no per-response score)
    # every usable record reaches a batch. Pairs: the 12 finite ones; with margins, the 6 negative ones (i < 12)
    # contradict their label and are counted drops. Rated: the 8 prompts keep answers 3j and 3j + 2 (both
    # finite for even j), one answer for odd j (a counted single_response_prompt): 4 prompts of one comparison.
    assert n == {"margins": 6, "scores": 12, "ratings": 4}[rows_fn]
    if rows_fn == "margins":
        assert tr["dropped"].get("scores_contradict_label", 0) + va["dropped"].get("scores_contradict_label", 0) == 6


# ---------------------------------------------------------------- 4. rmlab.score on a file with no records


def test_rmlab_score_on_blank_lines_exits_non_zero(tiny_llama, tmp_path, capsys):
    from rmlab.score import main

    export = tiny_llama.save_pretrained(tmp_path / "export")
    src = write(tmp_path, "blank.jsonl", b"\n\n   \n\t\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        main([src, "--model", str(export), "-o", str(out), "--no-progress", "--threads", "1", "--device", "cpu"])
    msg = str(e.value.code)
    assert e.value.code != 0 and msg.startswith(f"rmlab.score: {src}: ") and "no records" in msg, msg
    assert not out.exists()


def test_score_file_with_no_records_is_a_data_error(tmp_path):
    from rmlab.score import score_file

    for name, body in [
        ("blank.jsonl", b"\n \n"),
        ("empty_list.json", b"[]"),
        ("blank.jsonl.gz", gzip.compress(b"\n\n")),
    ]:
        src = write(tmp_path, name, body)
        with pytest.raises(DataError, match="no records") as e:
            score_file(_NeverCalled(), src, str(tmp_path / "o.jsonl"), progress=False)
        assert e.value.where == src and e.value.hint


# ---------------------------------------------------------------- 5. not gzip, damaged gzip, folders


def test_a_gz_that_is_not_gzip_says_so(tmp_path):
    for name in ("d.jsonl.gz", "d.json.gz"):
        path = write(tmp_path, name, jl(GOOD))
        with pytest.raises(DataError) as e:
            load(path)
        assert e.value.where == path
        assert e.value.problem == "the name ends in .gz but the file is not gzip-compressed"
        assert "cut off" not in str(e.value) and f"rename it to {name[:-3]}" in e.value.hint
        _, report = load(path, on_error="skip")
        assert dict(report.dropped) == {"bad_record: the name ends in .gz but the file is not gzip-compressed": 1}


def test_a_gzip_file_without_gz_in_its_name_says_so(tmp_path):
    path = write(tmp_path, "d.jsonl", gzip.compress(jl(GOOD)))
    with pytest.raises(DataError, match="gzip-compressed but its name does not end in .gz") as e:
        load(path)
    assert "rename it to d.jsonl.gz" in e.value.hint


def test_damaged_and_cut_off_gzip(tmp_path):
    body = gzip.compress(b"".join(jl({**GOOD, "prompt": f"p{i}"}) for i in range(400)))
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0xFF  # zlib.error escaped before
    path = write(tmp_path, "bad.jsonl.gz", bytes(damaged))
    with pytest.raises(DataError, match=r"bad.jsonl.gz:\d+: the compressed data is damaged") as e:
        load(path)
    assert "download it again" in e.value.hint
    _, report = load(path, on_error="skip")
    assert sum(v for k, v in report.dropped.items() if "damaged" in k) == 1
    # a cut-off .json.gz (one document) raised EOFError before
    path = write(tmp_path, "cut.json.gz", gzip.compress(json.dumps([GOOD] * 200).encode())[:-40])
    with pytest.raises(DataError, match="cut.json.gz: the file is cut off"):
        load(path)


def test_an_empty_folder_is_not_file_not_found(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(DataError) as e:
        load(str(folder))
    assert e.value.where == str(folder) and e.value.problem == "the folder has no data files (it is empty)"
    assert ".jsonl" in e.value.hint and "file not found" not in str(e.value)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"the folder has no data files \(it holds 1 other entries, e.g. notes.txt\)"):
        load(str(folder))
    with pytest.raises(DataError, match="no file matches the pattern"):
        load(str(folder / "*.jsonl"))
    _, report = load([str(folder), write(tmp_path, "ok.jsonl", jl(GOOD))], on_error="skip")
    assert report.kept == 1 and dict(report.dropped) == {"bad_record: the folder has no data files": 1}


def test_a_missing_file_is_still_file_not_found(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load(str(tmp_path / "gone.jsonl"))


def test_a_list_mapping_where_one_field_is_read_is_a_config_error(tmp_path):
    """data.fields.chosen=[a, b] for chat (read as messages, not joined text) used to escape as
    `TypeError: unhashable type: 'list'` from the first record; now it is refused before reading."""
    path = write(tmp_path, "d.jsonl", jl(GOOD))
    with pytest.raises(ValueError, match=r"data.fields \['chosen'\] must each name one field for data.format=chat"):
        load(path, "chat", {"chosen": ["a", "b"]})
    with pytest.raises(ValueError, match=r"data.fields \['margin'\] must each name one field"):
        load(path, "pairs", {"margin": ["m1", "m2"]})
    (g,), _ = load(path, "pairs", {"prompt": ["prompt", "chosen"]})  # text fields still join
    assert g.prompt == "p0\n\ngood"
