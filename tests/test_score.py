"""Scores do not depend on batch size or padding side; rmlab.score streams; the export matches in plain transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rmlab.data.simulator import SimulatorConfig, generate
from rmlab.score import Scorer, batches_by_length, parse_fields, score_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: no thread-pool contention


def _items(n=6, k=3):
    # k responses per prompt with different lengths, so every batch size pads something
    return [(g.prompt, g.responses) for g in generate(SimulatorConfig(num_prompts=n, k=k, seed=5))]


@pytest.mark.parametrize("backbone", ["tiny_llama", "minilm"])
def test_rewards_do_not_depend_on_batch_size_or_padding_side(backbone, request):
    model = request.getfixturevalue(backbone)
    items = _items()
    ref = None
    for side in ("right", "left"):
        for bs in (1, 3, 8):
            got = torch.tensor(Scorer(model, max_length=256, padding_side=side, batch_size=bs).score(items))
            if ref is None:
                ref = got
                assert ref.std() > 0  # rewards differ across responses: the comparison means something
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_eval_loader_rewards_do_not_depend_on_batch_size_or_padding_side(tiny_llama):
    """The eval path (datamodule batches of whole groups) gives the same rewards as rmlab.score."""
    from rmlab.data.datamodule import build_datamodule
    from rmlab.evaluate import score_loader

    per_key = {}
    for side in ("right", "left"):
        for groups_per_batch in (1, 3, 8):
            dm = build_datamodule(
                tokenizer=tiny_llama.tokenizer,
                simulator={"num_prompts": 40, "k": 3},
                val_fraction=0.3,
                max_length=256,
                padding_side=side,
                max_groups=groups_per_batch,
                cache=False,
            )
            dm.setup("validate")
            p = score_loader(tiny_llama, dm.val_dataloader())
            # key each response by (group id, position in the group): batching reorders groups
            pos = {}
            keys = []
            for g in p.group.tolist():
                keys.append((p.group_ids[g], pos.get(g, 0)))
                pos[g] = pos.get(g, 0) + 1
            per_key[(side, groups_per_batch)] = dict(zip(keys, p.reward.tolist()))
    ref = per_key[("right", 1)]
    assert len(ref) >= 15
    for got in per_key.values():
        assert got.keys() == ref.keys()
        assert max(abs(got[k] - ref[k]) for k in ref) < 1e-5
    # and rmlab.score on the same texts agrees with the eval path
    sim = {g.group_id: g for g in generate(SimulatorConfig(num_prompts=40, k=3, seed=0))}
    gids = sorted({gid for gid, _ in ref})
    scored = Scorer(tiny_llama, max_length=256).score([(sim[g].prompt, sim[g].responses) for g in gids])
    for gid, rs in zip(gids, scored):
        for i, r in enumerate(rs):
            assert r == pytest.approx(ref[(gid, i)], abs=1e-5)


def test_batches_by_length_respects_both_budgets():
    lens = [5, 50, 7, 6, 49, 8]
    b = batches_by_length(lens, batch_size=3, max_tokens=100)
    # sorted 5,6,7 fill 3 rows | 8 then 49 (2 x 49 = 98 <= 100) | 50 (3 x 50 > 100)
    assert b == [[0, 3, 2], [5, 4], [1]]
    assert all(len(x) <= 3 and len(x) * max(lens[i] for i in x) <= 100 for x in b)
    assert sorted(i for x in b for i in x) == list(range(6))


def test_score_file_streams_keeps_order_and_fields(tiny_llama, tmp_path, monkeypatch):
    items = _items(n=7, k=2)
    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        for i, (p, rs) in enumerate(items):
            if i % 2:
                f.write(json.dumps({"q": p, "chosen": rs[0], "rejected": rs[1], "id": i}) + "\n")
            else:
                f.write(json.dumps({"q": p, "a": rs[0], "id": i}) + "\n")
    import rmlab.score as score_mod

    scorer = Scorer(tiny_llama, max_length=256, batch_size=2)
    seen, read = [], [0]
    real, real_rows, real_read = scorer.score, scorer.rows, score_mod.read_records

    def counting_read(path):  # how far the reader has got when each chunk is scored
        for x in real_read(path):
            read[0] += 1
            yield x

    monkeypatch.setattr(score_mod, "read_records", counting_read)
    monkeypatch.setattr(scorer, "rows", lambda its: seen.append((len(its), read[0])) or real_rows(its))
    n = score_file(
        scorer, str(src), str(tmp_path / "out.jsonl"), parse_fields("prompt=q,response=a"), buffer=3, progress=False
    )
    # never more than --buffer records in memory: each chunk is scored before the next is read
    assert n == 7 and seen == [(3, 3), (3, 6), (1, 7)]
    out = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [r["id"] for r in out] == list(range(7))
    direct = real(items)
    for i, r in enumerate(out):
        if i % 2:
            assert r["reward_chosen"] == pytest.approx(direct[i][0], abs=1e-5)
            assert r["reward_rejected"] == pytest.approx(direct[i][1], abs=1e-5)
            assert r["p_chosen"] == pytest.approx(1 / (1 + math.exp(r["reward_rejected"] - r["reward_chosen"])))
            assert r["chosen"] == items[i][1][0]  # input fields kept
        else:
            assert r["reward"] == pytest.approx(direct[i][0], abs=1e-5) and "reward_chosen" not in r


def test_score_file_names_the_missing_field(tiny_llama, tmp_path):
    from rmlab.data.sources import DataError

    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"question": "hi", "answer": "yo"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1.*'prompt'"):
        score_file(Scorer(tiny_llama), str(src), str(tmp_path / "o.jsonl"), progress=False)
    with pytest.raises(SystemExit, match="--fields"):
        parse_fields("question")


@pytest.mark.parametrize("backbone", ["tiny_llama", "minilm"])
def test_export_in_a_plain_transformers_pipeline_gives_rmlab_scores(backbone, request, tmp_path):
    from transformers import pipeline

    model = request.getfixturevalue(backbone)
    out = model.save_pretrained(tmp_path / backbone, extra={"reward_mean": 0.25, "reward_std": 2.0})
    items = _items(n=2, k=2)
    ours = Scorer(model, max_length=512).score(items)
    pipe = pipeline("text-classification", model=str(out), function_to_apply="none", device="cpu")
    for (p, rs), mine in zip(items, ours):
        for r, m in zip(rs, mine):
            # An encoder reads [CLS] prompt [SEP] response [SEP] with token_type_ids all 0: one text with the
            # [SEP] written in it (a text *pair* would set segment ids 1 and shift the score). A causal LM
            # reads prompt + response.
            x = f"{p} {model.tokenizer.sep_token} {r}" if model.pooling == "first" else p + r
            o = pipe(x)
            o = o[0] if isinstance(o, list) else o  # a text pair comes back as one dict
            assert o["score"] == pytest.approx(m, abs=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rmlab"]["reward_mean"] == 0.25 and cfg["rmlab"]["reward_std"] == 2.0  # normalization travels with it


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ('{"prompt": "hi", "response": "yo"}\n{"prompt": "hi", \n', ":2", "malformed JSON"),
        ('{"prompt": "hi \\ud800", "response": "yo"}\n', ":1", "lone surrogate"),
        ('{"prompt": ' + "[" * 100 + "]" * 100 + ', "response": "yo"}\n', ":1", "nested more than 64 levels"),
        ("\n\n  \n", "", "has no records"),
    ],
)
def test_rmlab_score_bad_input_says_what_rmlab_score_can_do(tiny_llama, tmp_path, text, where, problem):
    """The reader's hints name train.py's keys (data.on_error=skip, data.source); rmlab.score has neither: it
    stops at the first bad record. Its message keeps the file, the line and the problem, with a next step it can
    take."""
    from rmlab.score import main

    export = tiny_llama.save_pretrained(tmp_path / "export")
    src = tmp_path / "in.jsonl"
    src.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(SystemExit) as err:
        main([str(src), "--model", str(export), "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    msg = str(err.value.code)
    assert msg.startswith(f"rmlab.score: {src}{where}: ") and problem in msg, msg
    assert "data.on_error" not in msg and "data.source" not in msg, msg
    assert "\n  -> " in msg, msg  # still a next step
