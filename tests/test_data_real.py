"""The real datasets in ../shared/data: HH prompts, AlpacaEval folding, and a few training steps on each
config with model=tiny_llama, with the data report's books balanced."""

from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter

import pytest

from rmlab.data.formats import HH_ASSISTANT, records_to_groups, split_implicit_prompt
from rmlab.data.sources import read_records
from rmlab.data.types import DataReport
from tests.conftest import SHARED_DATA, compose, needs_shared_data

ALPACA = SHARED_DATA / "alpaca_eval2" / "weighted_alpaca_eval_gpt4_turbo.annotations.jsonl.gz"


@needs_shared_data
def test_hh_implicit_prompt_is_the_common_prefix_on_all_pairs():
    with gzip.open(SHARED_DATA / "hh_rlhf_harmless" / "test.jsonl.gz", "rt") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2312
    for r in records:
        chosen, rejected = r["chosen"], r["rejected"]
        common = os.path.commonprefix([chosen, rejected])
        prompt, a, b = split_implicit_prompt(chosen, rejected)
        # The prompt is the common prefix, cut right after its last assistant marker.
        assert prompt == common[: common.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)]
        assert prompt + a == chosen and prompt + b == rejected
        assert HH_ASSISTANT not in common[len(prompt) :]


@needs_shared_data
def test_hh_prompts_through_the_implicit_prompt_adapter_are_the_common_prefix():
    """The same check through the path training takes: read_records -> records_to_groups(format=implicit_prompt)."""
    path = SHARED_DATA / "hh_rlhf_harmless" / "test.jsonl.gz"
    with gzip.open(path, "rt") as f:
        records = {f"{path}:{n}": json.loads(line) for n, line in enumerate(f, start=1)}
    report = DataReport()
    groups = records_to_groups(read_records(str(path)), "implicit_prompt", None, report)
    assert report.loaded == len(records) == 2312 and report.balanced

    def expected(r):
        common = os.path.commonprefix([r["chosen"], r["rejected"]])
        prompt = common[: common.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)]
        return prompt, r["chosen"][len(prompt) :], r["rejected"][len(prompt) :]

    kept = {g.source: g for g in groups}
    assert len(kept) == len(groups) == report.kept
    for where, r in records.items():
        prompt, a, b = expected(r)
        if where in kept:
            g = kept[where]
            assert g.prompt == prompt and g.responses == [a, b], where
            assert [(c.winner, c.loser, c.tie) for c in g.comparisons] == [(0, 1, False)]  # chosen wins
        else:  # every record not kept is a counted drop for a reason that holds for it
            assert not a.strip() or not b.strip(), where
    assert dict(report.dropped) == {"empty_response": len(records) - len(kept)} and len(kept) == 2308


@needs_shared_data
def test_alpaca_eval_folds_to_805_prompts_of_56_to_58_responses():
    report = DataReport()
    fields = {"prompt": "instruction", "response": "output_2", "score": "preference"}
    groups = records_to_groups(
        read_records(str(ALPACA)), "ratings", fields, report, pairing="best_vs_rest", score_offset=-1.0
    )
    assert report.loaded == 46680 and report.balanced and len(groups) == 805
    # 840 outputs repeat another model's text for the same prompt: counted, so K is 56-58 less those.
    # 32 empty outputs: 24 blank, 8 a lone zero width space (U+200B; kept as content before, see formats.is_blank).
    assert dict(report.dropped) == {"duplicate": 840, "empty_response": 32}
    assert report.kept == sum(g.n_records for g in groups) == 46680 - 872
    ks = [len(g.responses) for g in groups]
    assert max(ks) == 58 and sum(ks) / len(ks) > 56  # a few prompts get many identical short answers
    assert report.extra["source_k_per_prompt"] == {"min": min(ks), "max": 58, "prompts": 805}
    assert all(0.0 <= s <= 1.0 for g in groups for s in g.scores)  # preference - 1 is a probability
    assert all(len(g.comparisons) == len(g.responses) - 1 for g in groups)


# data=<name> on the whole file: records in it, and the drops the file itself causes (over_max_k, which follows
# the config's max_k, is the rest; the books must balance either way).
WHOLE = {
    "hh_harmless": (2312, {"empty_response": 4}),
    "alpaca_eval2": (46680, {"duplicate": 840, "empty_response": 32}),  # 8 of them a lone U+200B
    "pandalm": (
        999,
        {
            "duplicate": 100,
            "empty_response": 54,
            "bad_record: field 'response1' must be a string, got bool": 4,
            "bad_record: field 'response2' must be a string, got bool": 2,
        },
    ),
    "prometheus": (320, {}),
}


@pytest.mark.slow
@pytest.mark.shared_data
@needs_shared_data
def test_whole_files_are_accounted_for(tmp_path):
    """Each real config on its whole file (no max_records): loaded = kept + the sum of the drops, per split and
    for comparisons, and every record of the file is loaded. About 20 s on 2 cores (byte tokenizer, no cache)."""
    from hydra.utils import instantiate

    from rmlab.models import build_tokenizer

    tok = build_tokenizer("byt5", None)
    for name, (total, file_drops) in WHOLE.items():
        cfg = compose([f"data={name}", "model=tiny_llama", "data.cache=false"], tmp_path / name)
        assert cfg.data.max_records is None
        dm = instantiate(cfg.data, tokenizer=tok, _convert_="all")
        dm.setup("fit")
        parts = [dm.report["train"], dm.report["val"]]
        for part in parts:
            rec, cmp = part["records"], part["comparisons"]
            assert rec["loaded"] == rec["kept"] + sum(rec["dropped"].values()), (name, part)
            assert cmp["loaded"] == cmp["kept"] + sum(cmp["dropped"].values()), (name, part)
            assert part["balanced"] and rec["kept"] > 0, (name, part)
        assert sum(p["records"]["loaded"] for p in parts) == total, name
        dropped = Counter()
        for part in parts:
            dropped.update(part["records"]["dropped"])
        over_k = dropped.pop("over_max_k", 0)
        assert dict(dropped) == file_drops, name
        assert (over_k > 0) == (name == "alpaca_eval2"), name  # only AlpacaEval has more than max_k per prompt


# data=<name>, overrides that keep it to seconds on 2 cores, and the figures its report must show.
REAL = {
    "hh_harmless": (["data.max_records=240"], dict(loaded=240)),
    "alpaca_eval2": (
        [
            "data.max_records=4830",
            "data.format_options.max_prompts=40",
            "data.format_options.max_k=4",
            "data.val_fraction=0.25",
        ],
        dict(loaded=4830, max_k=4),
    ),
    "pandalm": (["data.max_records=300"], dict(loaded=300)),
    "prometheus": (["data.max_records=160"], dict(loaded=160, max_k=4)),
}


def train_real(name: str, extra: list[str], tmp_path):
    from rmlab.train import run

    overrides = [
        f"data={name}",
        "model=tiny_llama",
        "trainer.max_steps=3",
        "export=false",
        "logger=csv",
        "data.max_length=128",
        "data.min_prompt_tokens=16",
        "data.cache=false",
        *extra,
    ]
    summary = run(compose(overrides, tmp_path / name))
    report = json.loads((tmp_path / name / "data_report.json").read_text())
    return summary, report


@pytest.mark.slow
@needs_shared_data
@pytest.mark.parametrize("name", list(REAL))
def test_real_dataset_trains_and_its_report_balances(name, tmp_path, capsys):
    extra, want = REAL[name]
    summary, report = train_real(name, extra, tmp_path)
    assert summary["train_steps"] == 3 and 0.0 <= summary["val_acc"] <= 1.0
    assert math.isfinite(summary["metrics"]["val/loss"])
    train, val = report["train"], report["val"]
    for part in (train, val):
        rec, cmp = part["records"], part["comparisons"]
        assert rec["loaded"] == rec["kept"] + sum(rec["dropped"].values())
        assert cmp["loaded"] == cmp["kept"] + sum(cmp["dropped"].values())
        assert part["balanced"] and rec["kept"] > 0 and part["groups"] > 0
    assert train["records"]["loaded"] + val["records"]["loaded"] == want["loaded"]
    if "max_k" in want:
        assert train["k_per_prompt"]["max"] == want["max_k"]
    assert train["tokens_per_row"]["max"] <= 128  # the truncation policy held
    out = capsys.readouterr().out
    assert f"[{name}/train] records loaded={train['records']['loaded']} kept={train['records']['kept']}" in out


@pytest.mark.slow
def test_own_field_names_train_through_overrides_alone(tmp_path):
    """The README example: a jsonl with its own names, mapped with data.fields.* on the command line."""
    rows = [
        {
            "question": f"What is {i} plus {i}?",
            "good_answer": f"It is {2 * i}.",
            "bad_answer": f"It is {2 * i + 1}.",
            "votes": ["A", "A>B", "B"][i % 3],
            "topic": "math",
        }
        for i in range(40)
    ]
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"data.source={src}",
        "data.fields.prompt=question",
        "data.fields.chosen=good_answer",
        "data.fields.rejected=bad_answer",
        "data.fields.label=votes",
        "data.fields.subset=topic",
        "data.val_fraction=0.25",
        "data.max_groups=4",
    ]
    summary, report = train_real("local", overrides, tmp_path)
    assert summary["train_steps"] == 3
    total = report["train"]["records"]["kept"] + report["val"]["records"]["kept"]
    assert total == 40 and report["train"]["balanced"] and report["val"]["balanced"]
