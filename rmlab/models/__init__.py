"""Reward models: one interface (``RewardModel``), one builder (``build_model``), one scoring loop.

- ``base``: the interface every model implements, pooling by attention mask;
- ``backbone``: tokenizers and transformers backbones, loaded one way for every head;
- ``scalar``: backbone + one-output head (the default reward model);
- ``attributes``: one output per attribute, combined into one reward (ArmoRM);
- ``generative``: a causal LM as a Yes/No verifier or an A/B pairwise judge;
- ``packing``: padding-free and prefix-shared forwards for causal LMs;
- ``lora``: adapters through peft, merged at export;
- ``builder``: ``build_model`` (the ``_target_`` of conf/model/) and ``load_export``;
- ``scoring``: ``score_batches``, batches -> rewards, used by validation reports, eval and rmlab.score.
"""

from rmlab.models.backbone import build_tokenizer, minilm_path, read_export_meta
from rmlab.models.base import RewardModel, pool_index
from rmlab.models.builder import HEADS, build_model, load_export
from rmlab.models.scalar import ScalarRewardModel
from rmlab.models.scoring import Scored, score_batches

__all__ = [
    "HEADS",
    "RewardModel",
    "ScalarRewardModel",
    "Scored",
    "build_model",
    "build_tokenizer",
    "load_export",
    "minilm_path",
    "pool_index",
    "read_export_meta",
    "score_batches",
]
