"""The batch contract is declared once (rmlab.data.types) and every form follows it; the tokenization cache key
is derived from every argument that shapes the tokenized data."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch

from rmlab.data import types
from rmlab.data.collate import RewardBatch, collate
from rmlab.data.datamodule import NOT_IN_CACHE_KEY, RewardDataModule
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
    # A record-level group holds each per-response list under its declared name.
    assert {f.group_name for f in resp} <= names(types.PreferenceGroup)


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
    "max_records": 5,
    "on_error": "skip",
    "max_tokens": 4096,
    "max_responses": 8,
    "seed": 3,
    "hub_kwargs": {"data_dir": "harmless-base"},
    "format_options": {"max_k": 4},
    "template": "a template",
    "pair_batching": "shuffled",
    "max_train_prompts": 10,
}


def test_cache_key_changes_with_every_argument_that_shapes_the_data(tmp_path, monkeypatch):
    from rmlab.models import build_tokenizer

    monkeypatch.chdir(tmp_path)  # the sources above do not exist: their file stamps are empty
    tok = build_tokenizer("byt5", None)
    params = [p for p in inspect.signature(RewardDataModule.__init__).parameters if p != "self"]
    shaping = [p for p in params if p not in NOT_IN_CACHE_KEY]
    assert set(shaping) == set(CHANGED), "a new datamodule argument: add it to CHANGED or to NOT_IN_CACHE_KEY"
    base = RewardDataModule(tokenizer=tok)._cache_key()
    assert RewardDataModule(tokenizer=tok)._cache_key() == base
    for arg, value in CHANGED.items():
        assert RewardDataModule(tokenizer=tok, **{arg: value})._cache_key() != base, arg
    for arg in NOT_IN_CACHE_KEY - {"tokenizer", "output_dir"}:  # how batches are drawn: the same cache
        default = inspect.signature(RewardDataModule.__init__).parameters[arg].default
        other = {"num_workers": 2, "cache": not default, "padding_side": "left", "sort_by_length": False,
                 "max_groups": 3, "global_batch_comparisons": 8}[arg]
        assert RewardDataModule(tokenizer=tok, **{arg: other})._cache_key() == base, arg


@pytest.mark.parametrize("subset", ["harmless-base", "helpful-base"])
def test_switching_hub_kwargs_subsets_misses_the_cache(tmp_path, monkeypatch, subset):
    """data=hh_rlhf data.hub_kwargs.data_dir=...: each subset gets its own cache entry (it used to share one)."""
    from rmlab.models import build_tokenizer

    monkeypatch.setenv("RMLAB_CACHE", str(tmp_path / "cache"))
    tok = build_tokenizer("byt5", None)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(4)))
    keys = {RewardDataModule(tokenizer=tok, source=str(src), hub_kwargs={"data_dir": d})._cache_key()
            for d in ("harmless-base", subset, None)}
    assert len(keys) == (2 if subset == "harmless-base" else 3)
