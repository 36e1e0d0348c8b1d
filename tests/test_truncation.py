"""The truncation policy (rmlab.data.tokenize), on hand-checked token values.

The byte tokenizer (``build_tokenizer("byt5", None)``) makes each token a byte + 3 and has only an end
token (eos = 1): a row is ``prompt + response + [1]``, so every expected id below is ``ord(c) + 3``.
"""

from __future__ import annotations

import pytest

from rmlab.data.tokenize import tokenize_groups
from rmlab.data.types import Comparison, DataReport, PreferenceGroup
from rmlab.models import build_tokenizer

EOS = 1


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("byt5", None)


def ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def group(prompt: str, *responses: str, pairs=((0, 1),)) -> PreferenceGroup:
    return PreferenceGroup(prompt=prompt, responses=list(responses), comparisons=[Comparison(w, lo) for w, lo in pairs])


def run(tok, groups, max_length, min_prompt_tokens):
    report = DataReport(loaded=len(groups), kept=len(groups))
    out = tokenize_groups(groups, tok, report, max_length=max_length, min_prompt_tokens=min_prompt_tokens)
    assert report.balanced, report.to_dict()
    return out, report


def test_byte_tokenizer_values(tok):
    assert tok(["ab"], add_special_tokens=False)["input_ids"] == [[ord("a") + 3, ord("b") + 3]] == [ids("ab")]


def test_nothing_is_cut_when_the_rows_fit(tok):
    (g,), report = run(tok, [group("abc", "XY", "Z")], max_length=6, min_prompt_tokens=2)
    assert g.prompt_ids == ids("abc") and g.response_ids == [ids("XY") + [EOS], ids("Z") + [EOS]]
    assert not report.truncated


def test_prompt_is_left_truncated_first_keeping_its_end(tok):
    # 10 prompt tokens + the longest response (XY + eos = 3) > 8: the prompt keeps its last 8 - 3 = 5 tokens.
    (g,), report = run(tok, [group("abcdefghij", "XY", "Z")], max_length=8, min_prompt_tokens=2)
    assert g.prompt_ids == ids("fghij")
    assert g.response_ids == [ids("XY") + [EOS], ids("Z") + [EOS]]  # the responses are untouched
    assert dict(report.truncated) == {"prompt_left_truncated": 1}
    assert g.max_row == 8


def test_prompt_stops_at_min_prompt_tokens_then_responses_keep_their_end(tok):
    # Longest row wants 10 + 11 tokens in 12: the prompt goes down to min_prompt_tokens = 4 ("ghij"), not to
    # 12 - 11 = 1; the 8 tokens left are the room for a response, which keeps its *end* (where the reward is
    # read): "0123456789" + eos -> "3456789" + eos. The short response is untouched.
    (g,), report = run(tok, [group("abcdefghij", "0123456789", "zz")], max_length=12, min_prompt_tokens=4)
    assert g.prompt_ids == ids("ghij")
    assert g.response_ids == [ids("3456789") + [EOS], ids("zz") + [EOS]]
    assert all(len(g.prompt_ids) + len(r) <= 12 for r in g.response_ids)
    assert dict(report.truncated) == {"prompt_left_truncated": 1, "response_left_truncated": 1}
    assert report.comparisons_kept == 1 and not report.comparisons_dropped


def test_a_short_prompt_is_kept_whole_and_only_the_response_is_cut(tok):
    # The prompt (3) is already under min_prompt_tokens (4): it stays whole; the response gets 10 - 3 = 7 tokens.
    (g,), report = run(tok, [group("abc", "0123456789", "z")], max_length=10, min_prompt_tokens=4)
    assert g.prompt_ids == ids("abc") and g.response_ids[0] == ids("456789") + [EOS]
    assert dict(report.truncated) == {"response_left_truncated": 1}


def test_sides_identical_after_truncation_are_dropped_and_counted(tok):
    # The two responses differ only in their first bytes: keeping their ends makes them identical.
    same = group("pp", "AAAA-shared-end", "BBBB-shared-end")
    out, report = run(tok, [same], max_length=12, min_prompt_tokens=2)
    assert out == []  # the group's one comparison is gone, so the record is dropped too
    assert dict(report.comparisons_dropped) == {"identical_after_truncation": 1}
    assert dict(report.dropped) == {"no_comparison_left_after_truncation": 1} and report.kept == 0
    assert report.comparisons_loaded == 1 and report.comparisons_kept == 0


def test_one_collapsed_comparison_in_a_bigger_group_drops_only_that_comparison(tok):
    g3 = group("pp", "AAAA-shared-end", "BBBB-shared-end", "C", pairs=((0, 1), (0, 2), (1, 2)))
    (g,), report = run(tok, [g3], max_length=12, min_prompt_tokens=2)
    # Room for a response: 12 - 2 = 10 tokens: "-shared-end" is 11 bytes + eos, so both keep "hared-end" + eos.
    assert g.response_ids[0] == g.response_ids[1] == ids("hared-end") + [EOS]
    assert list(zip(g.winner, g.loser)) == [(0, 2), (1, 2)]
    assert g.group_weight == [1 / 3, 1 / 3]  # eq 6 weight still counts the original 3 comparisons
    assert dict(report.comparisons_dropped) == {"identical_after_truncation": 1}
    assert report.kept == 1 and not report.dropped


def test_identical_texts_are_counted_apart_from_truncation(tok):
    out, report = run(tok, [group("pp", "same", "same")], max_length=32, min_prompt_tokens=2)
    assert out == [] and dict(report.comparisons_dropped) == {"identical_responses": 1}


def test_max_length_must_leave_room_for_a_response(tok):
    with pytest.raises(ValueError, match="data.max_length=5 leaves no room"):
        run(tok, [group("p", "a", "b")], max_length=5, min_prompt_tokens=4)
