"""Format adapters, field mapping and sources on small records the tests write themselves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rmlab.data.chat import split_conversations
from rmlab.data.formats import records_to_groups, split_implicit_prompt, votes_to_comparison
from rmlab.data.grouping import comparisons_from_scores, pick_k
from rmlab.data.sources import read_records
from rmlab.data.types import DataReport
from tests.conftest import needs_shared_data


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def groups_of(source, fmt, fields=None, **options):
    report = DataReport(name="t")
    groups = records_to_groups(read_records(source), fmt, fields, report, **options)
    assert report.balanced and report.kept == sum(g.n_records for g in groups), report.to_dict()
    return groups, report


def cmp_tuples(g):
    return [(g.responses[c.winner], g.responses[c.loser], c.margin, c.strength, c.tie) for c in g.comparisons]


def test_pairs_with_labels_in_every_convention(tmp_path):
    rows = [
        {"q": "p1", "a": "x", "b": "y", "won": 1},
        {"q": "p2", "a": "x", "b": "y", "won": "2"},
        {"q": "p3", "a": "x", "b": "y", "won": "B>A"},
        {"q": "p4", "a": "x", "b": "y", "won": "A=B"},
        {"q": "p5", "a": "x", "b": "y", "won": 0},
    ]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    groups, _ = groups_of(src, "pairs", {"prompt": "q", "chosen": "a", "rejected": "b", "label": "won"})
    got = [(g.prompt, *cmp_tuples(g)[0][:2], g.comparisons[0].tie) for g in groups]
    assert got == [
        ("p1", "x", "y", False),
        ("p2", "y", "x", False),
        ("p3", "y", "x", False),
        ("p4", "x", "y", True),
        ("p5", "x", "y", True),
    ]


def test_label_map_for_zero_based_labels(tmp_path):
    src = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "p", "r0": "x", "r1": "y", "pref": 0}, {"prompt": "q", "r0": "x", "r1": "y", "pref": 1}],
    )
    groups, _ = groups_of(
        src, "pairs", {"chosen": "r0", "rejected": "r1", "label": "pref"}, label_map={"0": "first", "1": "second"}
    )
    assert [cmp_tuples(g)[0][:2] for g in groups] == [("x", "y"), ("y", "x")]


@pytest.mark.parametrize(
    "votes, expected",
    [
        ([1, 1, 1], (0, 3, 1.0)),
        ([2, 1, 2], (1, 1, 1 / 3)),
        ([2, 2, 0], (1, 2, 2 / 3)),
        ([0, 0, 0], (None, 0, 0.0)),
        ([1, 2, 0], (None, 0, 0.0)),
    ],
)
def test_annotator_votes_become_strength_margin_or_tie(votes, expected):
    sides = [{1: 0, 2: 1, 0: None}[v] for v in votes]
    side, strength, margin = votes_to_comparison(sides)
    assert (side, strength) == expected[:2] and margin == pytest.approx(expected[2])


def test_three_annotators_and_group_by_prompt(tmp_path):
    rows = [
        {"instruction": "Fix this", "input": "teh cat", "r1": "the cat", "r2": "teh cat", "a1": 1, "a2": 1, "a3": 1},
        {"instruction": "Fix this", "input": "teh cat", "r1": "the cat", "r2": "a cat", "a1": "2", "a2": 1, "a3": 2},
        {"instruction": "Fix this", "input": "teh cat", "r1": "a cat", "r2": "teh cat", "a1": 0, "a2": 0, "a3": 1},
        {"instruction": "Say hi", "input": "", "r1": "hi", "r2": "bye", "a1": 1, "a2": 0, "a3": 2},
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    fields = {"prompt": ["instruction", "input"], "chosen": "r1", "rejected": "r2", "label": ["a1", "a2", "a3"]}
    groups, report = groups_of(src, "pairs", fields, group_by_prompt=True)
    assert [g.prompt for g in groups] == ["Fix this\n\nteh cat", "Say hi"]  # empty input left out
    g = groups[0]
    assert g.responses == ["the cat", "teh cat", "a cat"] and g.n_records == 3  # each response once
    assert cmp_tuples(g) == [
        ("the cat", "teh cat", 1.0, 3, False),
        ("a cat", "the cat", pytest.approx(1 / 3), 1, False),
        ("a cat", "teh cat", pytest.approx(1 / 3), 1, False),
    ]
    assert groups[1].comparisons[0].tie and report.extra["source_k_per_prompt"] == {"min": 2, "max": 3, "prompts": 2}


def test_implicit_prompt_and_drops(tmp_path):
    h = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:"
    rows = [
        {"chosen": h + " A good one.", "rejected": h + " No."},
        {"chosen": h + " same", "rejected": h + " same"},
        {"chosen": h + " ", "rejected": h + " x"},
        {"chosen": h + " A good one.", "rejected": h + " No."},
        {"chosen": "no markers", "rejected": "at all"},
        {"chosen": h + " a", "rejected": h + " b", "m": float("nan")},
    ]
    groups, report = groups_of(write_jsonl(tmp_path / "hh.jsonl", rows), "implicit_prompt", {"margin": "m"})
    assert [(g.prompt, *g.responses) for g in groups] == [(h, " A good one.", " No.")]
    assert dict(report.dropped) == {
        "identical_chosen_rejected": 1,
        "empty_response": 1,
        "duplicate": 1,
        "no_shared_assistant_prefix": 1,
        "nonfinite_margin": 1,
    }


def test_implicit_prompt_cut_when_responses_share_a_start():
    # The two last turns share "\n\nAssistant: I" - the cut is still at the marker, not inside the turn.
    p, a, b = split_implicit_prompt("\n\nHuman: q\n\nAssistant: I do", "\n\nHuman: q\n\nAssistant: I don't")
    assert (p, a, b) == ("\n\nHuman: q\n\nAssistant:", " I do", " I don't")


def test_chat_with_fallback_template_and_tokenizer_template(tmp_path):
    conv = [{"role": "user", "content": "hi"}]
    rec = {
        "chosen": conv + [{"role": "assistant", "content": "hello!"}],
        "rejected": conv + [{"role": "assistant", "content": "go away"}],
    }
    groups, _ = groups_of(write_jsonl(tmp_path / "c.jsonl", [rec]), "chat")
    assert (groups[0].prompt, *groups[0].responses) == ("\n\nHuman: hi\n\nAssistant:", " hello!", " go away")

    class Tok:  # a tokenizer with its own chat template (the path real chat models take)
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"

        def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt):
            import jinja2

            return jinja2.Template(chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)

    p, (a, b) = split_conversations([rec["chosen"], rec["rejected"]], Tok(), "unused")
    assert (p, a, b) == ("<user>hi</s><assistant>", "hello!</s>", "go away</s>")

    class Rewriting(Tok):  # a template whose full rendering does not start with the prompt's rendering
        chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}*{% endif %}"

    p, (a, b) = split_conversations([rec["chosen"], rec["rejected"]], Rewriting(), "unused")
    assert (p, a, b) == ("", "[user]hi[assistant]hello!", "[user]hi[assistant]go away")


def test_chat_prompt_in_its_own_field_and_score_margin(tmp_path):
    rec = {
        "q": "2+2?",
        "c": [{"role": "assistant", "content": "4"}],
        "r": [{"role": "assistant", "content": "5"}],
        "sc": 9,
        "sr": "3.5",
    }
    groups, _ = groups_of(
        write_jsonl(tmp_path / "c.jsonl", [rec]),
        "chat",
        {"prompt": "q", "chosen": "c", "rejected": "r", "chosen_score": "sc", "rejected_score": "sr"},
    )
    assert groups[0].prompt == "\n\nHuman: 2+2?\n\nAssistant:" and cmp_tuples(groups[0])[0][2] == 5.5


def test_ratings_long_form_pairings_ties_and_max_k(tmp_path):
    rows = [{"prompt": "p", "response": f"r{i}", "score": s} for i, s in enumerate([1, 3, 3, 2])]
    rows += [{"prompt": "lonely", "response": "x", "score": 1}, {"prompt": "p", "response": "r0", "score": 5}]
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    groups, report = groups_of(src, "ratings")
    g = groups[0]
    assert g.n_records == 4 and g.scores == [1, 3, 3, 2] and len(g.comparisons) == 6
    assert ("r1", "r0", 2.0, None, False) in cmp_tuples(g) and sum(c.tie for c in g.comparisons) == 1
    assert dict(report.dropped) == {"single_response_prompt": 1, "duplicate": 1}

    best, _ = groups_of(src, "ratings", pairing="best_vs_rest")
    assert [(w, lo) for w, lo, *_ in cmp_tuples(best[0])] == [("r1", "r2"), ("r1", "r3"), ("r1", "r0")]
    adj, _ = groups_of(src, "ratings", pairing="adjacent")
    assert [(w, lo, m) for w, lo, m, *_ in cmp_tuples(adj[0])] == [
        ("r1", "r2", 0.0),
        ("r2", "r3", 1.0),
        ("r3", "r0", 1.0),
    ]

    capped, report = groups_of(src, "ratings", max_k=2, max_k_strategy="spread")
    assert capped[0].responses == ["r0", "r1"] and capped[0].n_records == 2  # best and worst kept
    assert report.dropped["over_max_k"] == 2 and report.kept == 2


def test_pick_k_random_is_stable_per_prompt():
    s = [float(i) for i in range(57)]
    a, b = pick_k(s, 8, "random", "prompt A"), pick_k(s, 8, "random", "prompt A")
    assert a == b and len(set(a)) == 8 and a != pick_k(s, 8, "random", "prompt B")
    assert len(comparisons_from_scores(s)) == 1596  # all pairs of 57: why max_k exists


def test_ratings_wide_form_with_grader_lists_and_extract(tmp_path):
    rows = [
        {
            "text": "GRADE THIS: Q? ### A: answer one ### end",
            "completions": [{"out": "a", "g": [4, 5, 5]}, {"out": "b", "g": [1, 2, 3]}, {"out": "c", "g": "2"}],
        }
    ]
    src = write_jsonl(tmp_path / "w.jsonl", rows)
    groups, report = groups_of(
        src,
        "ratings",
        {"prompt": "text", "responses": "completions", "response": "out", "score": "g"},
        extract={"prompt": ["GRADE THIS:", "### A:"]},
        max_k=2,
    )
    g = groups[0]
    assert g.prompt == "Q?" and g.responses == ["a", "c"] and g.scores == pytest.approx([14 / 3, 2.0])  # best, worst
    assert report.truncated["responses_over_max_k"] == 1 and report.kept == 1  # one record, kept


def test_rankings_with_and_without_ranks(tmp_path):
    rows = [
        {"prompt": "p", "responses": ["best", "mid", "worst"]},
        {"prompt": "q", "responses": ["x", "y", "z"], "rk": [2, 1, 2]},
    ]
    groups, _ = groups_of(write_jsonl(tmp_path / "k.jsonl", rows), "rankings", {"ranks": "rk"}, higher_is_better=False)
    assert groups[0].ranks == [0.0, 1.0, 2.0]
    assert [(w, lo) for w, lo, *_ in cmp_tuples(groups[0])] == [("best", "mid"), ("best", "worst"), ("mid", "worst")]
    assert groups[1].ranks == [1.0, 0.0, 1.0] and [c.tie for c in groups[1].comparisons] == [False, True, False]


def test_every_local_source_type_gives_the_same_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    paths = [write_jsonl(tmp_path / "a.jsonl", rows)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "a.csv").write_text(
        "prompt,chosen,rejected\n" + "".join(f'{r["prompt"]},"{r["chosen"]}",{r["rejected"]}\n' for r in rows)
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    paths += [str(tmp_path / f"a.{s}") for s in ("jsonl.gz", "json", "csv", "parquet")]
    want = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    for p in paths:
        groups, _ = groups_of(p, "pairs")
        assert [(g.prompt, *g.responses) for g in groups] == want, p
    locs = [w for w, _ in read_records(paths[3])]
    assert locs[0].endswith("a.csv:2")  # csv lines count the header


def test_hub_path_through_datasets_load_dataset(tmp_path):
    # The hub branch calls datasets.load_dataset(name, split, **hub_kwargs); its local "json" builder runs
    # the same code path offline.
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    src = write_jsonl(tmp_path / "h.jsonl", rows)
    report = DataReport()
    recs = read_records("json", "train", {"data_files": src, "cache_dir": str(tmp_path / "hf")})
    groups = records_to_groups(recs, "pairs", None, report)
    assert [g.responses for g in groups] == [["a", "b"], ["c", "d"]] and groups[0].source == "json[train]:0"


def test_unknown_option_or_field_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="unknown data.format_options.*max_k"):
        groups_of(src, "pairs", max_kk=3)
    with pytest.raises(ValueError, match="data.fields \\['respone'\\] mean nothing"):
        groups_of(src, "ratings", {"respone": "x"})
    (c,) = comparisons_from_scores([1.0, 2.0])  # the higher score wins, by the score gap
    assert (c.winner, c.loser, c.margin, c.tie) == (1, 0, 1.0, False)


def test_tokenization_cache_sees_a_rewritten_file_and_a_code_change(tmp_path, monkeypatch):
    from rmlab.data import datamodule as dm_mod
    from rmlab.data.datamodule import build_datamodule
    from rmlab.models import build_tokenizer

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    tok = build_tokenizer("byt5", None)
    src = tmp_path / "d.jsonl"

    def loaded(n: int) -> int:
        write_jsonl(src, [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)])
        dm = build_datamodule(tokenizer=tok, source=str(src), val_fraction=0.0, max_length=64, cache=True)
        dm.setup("fit")
        return dm.report["train"]["records"]["loaded"]

    assert loaded(6) == 6
    assert loaded(9) == 9  # the same config and path with more records: the cache is not reused
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.pt"))) == 2
    assert loaded(9) == 9 and len(list((tmp_path / "cache" / "tokenized").glob("*.pt"))) == 3  # rewritten: new mtime
    # Same file, same config: a hit. Another version of the rmlab.data code: a miss.
    dm = build_datamodule(tokenizer=tok, source=str(src), val_fraction=0.0, max_length=64)
    key = dm._cache_key()
    assert build_datamodule(tokenizer=tok, source=str(src), val_fraction=0.0, max_length=64)._cache_key() == key
    monkeypatch.setattr(dm_mod, "data_code_version", lambda: "another version")
    assert dm._cache_key() != key


def test_ratings_carry_per_attribute_ratings_through_folding_and_max_k(tmp_path):
    """data.fields.attributes: HelpSteer-style columns become each response's attribute ratings (NaN when
    missing), folded by prompt and cut by max_k together with the responses."""
    import math

    from rmlab.data.formats import records_to_groups
    from rmlab.data.types import DataReport

    recs = [
        {"q": "p1", "a": "r1", "help": 4, "corr": 3, "verb": [1, 2]},  # a list of grades is reduced (mean)
        {"q": "p1", "a": "r2", "help": 1, "corr": None, "verb": 0},  # null -> NaN, masked in the loss
        {"q": "p1", "a": "r3", "help": 2, "corr": 2},  # missing -> NaN
        {"q": "p2", "a": "s1", "help": 0, "corr": 1, "verb": 3},
        {"q": "p2", "a": "s2", "help": 3, "corr": 4, "verb": 4},
    ]
    rep = DataReport()
    groups = records_to_groups(
        [(f"f.jsonl:{i + 1}", r) for i, r in enumerate(recs)],
        "ratings",
        {"prompt": "q", "response": "a", "score": "help", "attributes": ["help", "corr", "verb"]},
        rep,
        max_k=2,
        max_k_strategy="spread",
    )
    g1, g2 = groups
    assert g1.responses == ["r1", "r2"]  # best and worst kept; r3 dropped with its ratings
    assert g1.attributes[0] == [4.0, 3.0, 1.5]
    assert g1.attributes[1][0] == 1.0 and math.isnan(g1.attributes[1][1]) and g1.attributes[1][2] == 0.0
    assert g2.attributes == [[0.0, 1.0, 3.0], [3.0, 4.0, 4.0]]
    assert rep.loaded == 5 and rep.kept + sum(rep.dropped.values()) == 5 and rep.dropped["over_max_k"] == 1


@needs_shared_data
def test_prometheus_grade_as_a_single_attribute(tmp_path):
    """The Prometheus set as a real single-attribute check: its mean GPT-4 grade is each response's rating."""
    import torch
    from hydra.utils import instantiate

    from rmlab.models import build_tokenizer
    from tests.conftest import compose

    cfg = compose(["data=prometheus", "data.fields.attributes=[gpt4_score]", "data.cache=false"], tmp_path)
    dm = instantiate(cfg.data, tokenizer=build_tokenizer("byt5", None), _convert_="all")
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b.attributes.shape == (b.input_ids.shape[0], 1)
    assert torch.equal(b.attributes[:, 0], b.score.to(b.attributes.dtype))  # the same mean grade, 1..5
    assert 1.0 <= float(b.attributes.min()) and float(b.attributes.max()) <= 5.0


def test_label_swap_carries_the_side_scores_with_their_responses(tmp_path):
    """Scores belong to the responses: side 2 winning with the higher score is consistent (kept, margin
    +5); side 2 winning with the lower score contradicts the label (dropped). The label swaps the sides
    and the score gap with them."""
    rows = [
        {"prompt": "consistent", "chosen": "x", "rejected": "y", "label": "2", "cs": 3, "rs": 8},
        {"prompt": "contradicting", "chosen": "x", "rejected": "y", "label": "2", "cs": 8, "rs": 3},
        {"prompt": "first side", "chosen": "x", "rejected": "y", "label": "1", "cs": 8, "rs": 3},
        {"prompt": "first side wrong", "chosen": "x", "rejected": "y", "label": "1", "cs": 3, "rs": 8},
    ]
    groups, report = groups_of(
        write_jsonl(tmp_path / "d.jsonl", rows),
        "pairs",
        {"label": "label", "chosen_score": "cs", "rejected_score": "rs"},
    )
    assert [(g.prompt, *cmp_tuples(g)[0][:3]) for g in groups] == [
        ("consistent", "y", "x", 5.0),
        ("first side", "x", "y", 5.0),
    ]
    assert dict(report.dropped) == {"scores_contradict_label": 2}


@pytest.mark.parametrize("blank", ["\u200b", "\u200c\u200d", " \u2060 ", "\ufeff\n", "\u200b \u200b\t"])
def test_a_response_of_invisible_characters_is_empty(tmp_path, blank):
    """Zero width space, joiners, word joiner, BOM (alone or with whitespace) are no content: the
    record is dropped as empty_response and counted, in the pairs and the ratings/rankings adapters."""
    pairs = [{"prompt": "p", "chosen": blank, "rejected": "y"}, {"prompt": "q", "chosen": "x", "rejected": "y"}]
    groups, report = groups_of(write_jsonl(tmp_path / "p.jsonl", pairs), "pairs")
    assert [g.prompt for g in groups] == ["q"] and dict(report.dropped) == {"empty_response": 1}
    ranked = [{"prompt": "p", "responses": ["a", blank, "c"]}, {"prompt": "q", "responses": ["a", "b"]}]
    groups, report = groups_of(write_jsonl(tmp_path / "r.jsonl", ranked), "rankings")
    assert [g.prompt for g in groups] == ["q"] and dict(report.dropped) == {"empty_response": 1}
    rated = [{"prompt": "p", "response": blank, "score": 1}, {"prompt": "p", "response": "b", "score": 2}]
    rated.append({"prompt": "p", "response": "c", "score": 3})
    groups, report = groups_of(write_jsonl(tmp_path / "s.jsonl", rated), "ratings")
    assert [g.responses for g in groups] == [["b", "c"]] and report.dropped["empty_response"] == 1


def test_group_by_prompt_keeps_each_comparison_in_its_own_subset(tmp_path):
    """A hard comparison sharing a prompt with an easy one stays hard: records of different subsets are
    separate groups with the same prompt text (a group has one subset, read for all its comparisons)."""
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "subset": "easy"},
        {"prompt": "p", "chosen": "a", "rejected": "c", "subset": "hard"},
        {"prompt": "p", "chosen": "b", "rejected": "c", "subset": "easy"},
        {"prompt": "q", "chosen": "x", "rejected": "y", "subset": "hard"},
    ]
    groups, report = groups_of(
        write_jsonl(tmp_path / "d.jsonl", rows), "pairs", {"subset": "subset"}, group_by_prompt=True
    )
    got = [(g.prompt, g.subset, g.responses, [c[:2] for c in cmp_tuples(g)], g.n_records) for g in groups]
    assert got == [
        ("p", "easy", ["a", "b", "c"], [("a", "b"), ("b", "c")], 2),
        ("p", "hard", ["a", "c"], [("a", "c")], 1),
        ("q", "hard", ["x", "y"], [("x", "y")], 1),
    ]
    assert report.kept == 4 and not report.dropped
    # Per comparison, as the metrics read it (each comparison takes its group's subset).
    per_comparison = sorted((g.subset, g.responses[c.winner], g.responses[c.loser]) for g in groups for c in g.comparisons)
    assert per_comparison == [("easy", "a", "b"), ("easy", "b", "c"), ("hard", "a", "c"), ("hard", "x", "y")]
