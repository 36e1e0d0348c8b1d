"""The batch contract is declared once (rmlab.data.types) and every form follows it; the tokenization cache key
is derived from every argument that shapes the tokenized data."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from rmlab.data import types
from rmlab.data.collate import RewardBatch, collate
from rmlab.data.datamodule import BATCH_KEYS_IN_CACHE, CONFIGS, build_datamodule
from rmlab.data.tokenize import TokenizedGroup, subgroup
from rmlab.losses.base import Comparisons


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_form_carries_every_declared_field():
    cmp, resp = types.COMPARISON_FIELDS, types.RESPONSE_FIELDS
    assert {f.group_name for f in cmp + resp} <= names(TokenizedGroup)
    assert {f.name for f in cmp + resp} <= names(RewardBatch)
    assert {f.name for f in cmp} | {f.name for f in resp if f.name != "true_reward"} <= names(Comparisons)
    # A record's comparison holds exactly the declared fields that come from records.
    assert names(types.Comparison) - {"winner", "loser"} == {f.name for f in cmp if f.from_record}
    # A record-level group holds each per-response list read from records under its declared name; one computed by
    # tokenization (a critique's length) is not in a record.
    assert {f.group_name for f in resp if f.from_record} <= names(types.PreferenceGroup)
    assert {f.group_name for f in resp if not f.from_record}.isdisjoint(names(types.PreferenceGroup))


def test_collate_fills_missing_fields_with_their_declared_values_and_dtypes():
    g = TokenizedGroup(prompt_ids=[5], response_ids=[[7, 1], [8, 1], [9, 1]], winner=[0, 1], loser=[1, 2],
                       margin=[2.0, float("nan")], ranks=[0.0, 1.0, 2.0])
    b = collate([g], pad_id=0)
    dtypes = {"float": torch.float32, "long": torch.long, "bool": torch.bool}
    for f in types.COMPARISON_FIELDS:
        t = getattr(b, f.name)
        assert t.shape == (2,) and t.dtype == dtypes[f.dtype], f.name
    for f in types.RESPONSE_FIELDS:
        t = getattr(b, f.name)
        assert t.shape == (3,) and t.dtype == dtypes[f.dtype], f.name
    assert b.margin[0] == 2.0 and math.isnan(b.margin[1])  # given
    assert b.strength.tolist() == [-1, -1] and b.weight.tolist() == [1.0, 1.0] and b.tie.tolist() == [False, False]
    assert b.rank.tolist() == [0.0, 1.0, 2.0] and torch.isnan(b.score).all()
    # A sub-group keeps each field of the comparisons and responses it takes.
    s = subgroup(g, [1, 2], [1], "g#1", parent=0)
    assert s.winner == [0] and s.loser == [1] and math.isnan(s.margin[0]) and s.ranks == [1.0, 2.0]


def test_loss_side_comparisons_default_each_field_to_its_missing_value():
    c = Comparisons(winner=torch.tensor([0, 2]), loser=torch.tensor([1, 0]))
    assert torch.isnan(c.margin).all() and c.strength.tolist() == [-1, -1] and c.tie.tolist() == [False, False]
    assert c.weight.tolist() == [1.0, 1.0] and c.group_weight.tolist() == [0.5, 0.5]


# One changed value per argument that shapes the tokenized groups.
CHANGED = {
    "name": "other",
    "source": "other.jsonl",
    "format": "ratings",
    "fields": {"prompt": "q"},
    "split": "test",
    "val_source": "v.jsonl",
    "val_split": "validation",
    "val_fraction": 0.2,
    "simulator": {"num_prompts": 7},
    "max_length": 300,
    "min_prompt_tokens": 8,
    "reward_token": "eos",
    "max_records": 5,
    "on_error": "skip",
    "max_tokens": 4096,
    "max_responses": 8,
    "seed": 3,
    "hub_kwargs": {"data_dir": "harmless-base"},
    "format_options": {"max_k": 4},
    "pair_batching": "shuffled",
    "max_train_prompts": 10,
}


def test_cache_key_changes_with_every_setting_that_shapes_the_data(tmp_path, monkeypatch):
    from rmlab.models import build_tokenizer

    monkeypatch.chdir(tmp_path)  # the sources above do not exist: their file stamps are empty
    tok = build_tokenizer("byt5", None)
    batch_only = {"max_groups": 3, "sort_by_length": False, "padding_side": "left", "num_workers": 2,
                  "global_batch_comparisons": 8, "pin_memory": False, "budget": "packed"}
    every = {f.name for cls in CONFIGS.values() for f in dataclasses.fields(cls)}
    assert every == set(CHANGED) | set(batch_only), "a new data setting: add it to CHANGED or batch_only"
    assert set(BATCH_KEYS_IN_CACHE) <= set(CHANGED)
    base = build_datamodule(tokenizer=tok)._cache_key()
    assert build_datamodule(tokenizer=tok)._cache_key() == base
    for key, value in CHANGED.items():
        assert build_datamodule(tokenizer=tok, **{key: value})._cache_key() != base, key
    for key, value in batch_only.items():  # how batches are drawn: the same tokenized groups, the same cache
        assert build_datamodule(tokenizer=tok, **{key: value})._cache_key() == base, key
    assert build_datamodule(tokenizer=tok, template="a template")._cache_key() != base


def test_an_unknown_data_key_is_an_error_that_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown data option\(s\) data.max_lenght; valid keys: .*max_length"):
        build_datamodule(max_lenght=128)


@pytest.mark.parametrize("subset", ["harmless-base", "helpful-base"])
def test_switching_hub_kwargs_subsets_misses_the_cache(tmp_path, monkeypatch, subset):
    """data=hh_rlhf data.hub_kwargs.data_dir=...: each subset gets its own cache entry (it used to share one)."""
    from rmlab.models import build_tokenizer

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    tok = build_tokenizer("byt5", None)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(4)))
    keys = {build_datamodule(tokenizer=tok, source=str(src), hub_kwargs={"data_dir": d})._cache_key()
            for d in ("harmless-base", subset, None)}
    assert len(keys) == (2 if subset == "harmless-base" else 3)
