"""One builder for every reward model: ``build_model(head=..., **options)``, the ``_target_`` of conf/model/.

Heads (``model.head``), each registered with ``register_head``:

- ``scalar``: backbone + one-output head (rmlab.models.scalar); LoRA, packing and compile apply;
- ``attributes``: one output per attribute, combined into one reward (rmlab.models.attributes);
- ``verifier`` / ``judge``: a causal LM read through a judge template (rmlab.models.generative); with
  ``reasoning=true`` it writes a rationale before the answer (rmlab.models.reasoning);
- ``cloud``: a causal LM that writes a critique, then a reward head reads after it (rmlab.models.cloud).

A new head ``foo`` is one file, ``rmlab/models/foo.py``, that registers its build function with
``@register_head("foo", options=(...))``, plus one yaml in conf/model/ with ``head: foo`` (docs/heads.md has a
worked example). ``build_model`` imports ``rmlab.models.foo`` the first time it meets the name, so nothing else
needs an edit. Every option is checked against the head's list: a misspelled key is an error that lists the
valid ones, never silently ignored. ``load_export`` rebuilds whatever head an rmlab export holds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from rmlab.data.templates import REASONING_CUE
from rmlab.models.attributes import AttributeRewardModel, attribute_options
from rmlab.models.backbone import build_tokenizer, load_backbone, read_export_meta
from rmlab.models.base import RewardModel
from rmlab.models.generative import GenerativeVerifier, PairwiseJudge, check_restricted_head
from rmlab.models.liger import apply_liger
from rmlab.models.lora import apply_lora
from rmlab.models.packing import configure_speed
from rmlab.models.reasoning import ReasoningJudge, ReasoningVerifier
from rmlab.models.scalar import ScalarRewardModel

# Options every head takes (conf/model/parts/base.yaml); each head lists its own at registration.
COMMON_OPTIONS = (
    "name_or_path", "config", "tokenizer", "dropout", "trust_remote_code", "gradient_checkpointing", "attn_implementation",
    "liger",
)
# A head's build function: (head, tokenizer, backbone keyword arguments for load_backbone, own options) -> model.
HeadBuilder = Callable[[str, Any, dict[str, Any], dict[str, Any]], RewardModel]
BUILDERS: dict[str, HeadBuilder] = {}
HEAD_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_head(name: str, options: tuple[str, ...] = ()) -> Callable[[HeadBuilder], HeadBuilder]:
    """Register ``fn`` as the builder of ``model.head=name``, taking ``options`` beside the common ones."""

    def wrap(fn: HeadBuilder) -> HeadBuilder:
        BUILDERS[name], HEAD_OPTIONS[name] = fn, tuple(options)
        return fn

    return wrap


def find_head(head: str) -> HeadBuilder:
    """The registered builder; an unknown name is looked up once as the module ``rmlab.models.<head>``."""
    if head not in BUILDERS and head.isidentifier():
        try:
            importlib.import_module(f"rmlab.models.{head}")
        except ModuleNotFoundError as e:
            if e.name != f"rmlab.models.{head}":
                raise
    if head not in BUILDERS:
        raise ValueError(f"model.head must be one of {sorted(BUILDERS)}, got {head!r}")
    return BUILDERS[head]


def check_options(head: str, options: dict[str, Any]) -> None:
    """A head's own options must be among its listed ones; the error lists the valid keys."""
    find_head(head)
    unknown = sorted(k for k in options if k not in HEAD_OPTIONS[head])
    if unknown:
        valid = COMMON_OPTIONS + HEAD_OPTIONS[head]
        raise ValueError(
            f"unknown option(s) {', '.join('model.' + k for k in unknown)} for a {head} reward model; "
            f"valid keys: {', '.join(sorted(valid))}"
        )


def build_model(
    head: str = "scalar",
    name_or_path: str | None = None,
    config: dict | None = None,
    tokenizer: str | None = None,
    dropout: bool | float = False,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = "sdpa",
    liger: bool = False,
    **options: Any,
) -> RewardModel:
    """Build a reward model.

    name_or_path: a hub name, a local directory (an rmlab export restores its own settings), or ``minilm``
        for the bundled all-MiniLM-L6-v2. config: build from this transformers config with random weights
        instead (``model_type`` plus its fields). tokenizer: ``byt5`` for a file-free byte tokenizer, another
        name/path, or None (= name_or_path). ``options``: the head's own keys (``HEAD_OPTIONS``), documented in
        conf/model/*.yaml. liger: Liger's RMSNorm/RoPE/SwiGLU kernels on the backbone (a GPU and
        ``rmlab[liger]``; rmlab.models.liger).
    """
    check_options(head, options)
    tok = build_tokenizer(tokenizer, name_or_path, trust_remote_code)
    backbone = dict(
        name_or_path=name_or_path,
        config=config,
        dropout=dropout,
        trust_remote_code=trust_remote_code,
        gradient_checkpointing=gradient_checkpointing,
        attn_implementation=attn_implementation,
        liger=bool(liger),
    )
    return BUILDERS[head](head, tok, backbone, options)


SEQUENCE_HEAD_OPTIONS = (
    "pooling", "lora", "forward_mode", "row_tokens", "compile", "attention", "last_layer_at_reads", "head_options"
)


@register_head("scalar", SEQUENCE_HEAD_OPTIONS)
@register_head("attributes", SEQUENCE_HEAD_OPTIONS)
def build_sequence_head(head: str, tok: Any, backbone: dict[str, Any], options: dict[str, Any]) -> RewardModel:
    """The scalar head, or the attribute head (which always runs padded: its gate reads the prompt's hidden
    state; the speed keys are accepted so that ``model=tiny_llama model.head=attributes`` works)."""
    name_or_path = backbone["name_or_path"]
    attrs = attribute_options(options.get("head_options"), name_or_path) if head == "attributes" else None
    hf = load_backbone("seq_cls", tok, num_labels=len(attrs["attributes"]) if attrs else 1, head_name=head, **backbone)
    lora = options.get("lora")
    if lora and int(lora.get("r") or 0) > 0:  # adapters + a trained head, in place (rmlab.models.lora)
        apply_lora(hf, **lora)
    pooling = options.get("pooling") or "auto"
    meta = getattr(hf.config, "rmlab", None)
    if isinstance(meta, dict) and pooling == "auto":
        pooling = meta.get("pooling", "auto")
    if attrs is not None:
        model = AttributeRewardModel(hf, tok, pooling, **attrs)
        model.load_gate(name_or_path)
        return model
    return configure_speed(
        ScalarRewardModel(hf, tok, pooling),
        options.get("forward_mode") or "padded",
        options.get("row_tokens"),
        bool(options.get("compile") or False),
        options.get("attention") or "auto",
        options.get("last_layer_at_reads", True) is not False,
    )


GENERATIVE_OPTIONS = ("template", "answers", "answer_ids", "reasoning", "reasoning_cue", "max_critique_tokens", "generation")


@register_head("verifier", GENERATIVE_OPTIONS)
@register_head("judge", GENERATIVE_OPTIONS)
def build_generative(head: str, tok: Any, backbone: dict[str, Any], options: dict[str, Any]) -> GenerativeVerifier:
    """A ``GenerativeVerifier`` (head=verifier) or ``PairwiseJudge`` (head=judge) on a causal LM; with
    ``reasoning=true`` the one that writes a rationale before its answer (rmlab.models.reasoning). Template, answers,
    answer ids and reasoning settings: the config's, else an rmlab export's of the same kind, else the defaults.
    ``liger`` is applied last: ``check_restricted_head`` runs a forward while the model is still on the CPU, where
    Liger's Triton kernels cannot run (the check is about the LM head, which Liger does not touch)."""
    hf = load_backbone("causal", tok, **{**backbone, "liger": False})
    meta = getattr(hf.config, "rmlab", None) or {}
    kind = "verifier" if head == "verifier" else "judge"
    saved = meta if meta.get("head") == kind else {}
    reasoning = options.get("reasoning")
    reasoning = bool(saved.get("reasoning")) if reasoning is None else bool(reasoning)
    answers = options.get("answers")
    common = dict(
        template=options.get("template") or saved.get("template"),
        answers=answers or saved.get("answers"),
        answer_ids=options.get("answer_ids") or (saved.get("answer_ids") if not answers else None),
    )
    if reasoning:
        r = saved.get("reasoning") or {}
        cls = ReasoningVerifier if kind == "verifier" else ReasoningJudge
        model = cls(
            hf, tok, **common,
            cue=options.get("reasoning_cue") or r.get("cue") or REASONING_CUE,
            max_critique_tokens=options.get("max_critique_tokens") or r.get("max_critique_tokens") or 64,
            generation={**(r.get("generation") or {}), **(options.get("generation") or {})},
        )
    else:
        model = (GenerativeVerifier if kind == "verifier" else PairwiseJudge)(hf, tok, **common)
    check_restricted_head(model)
    if backbone.get("liger"):
        apply_liger(model.hf)
    return model


HEADS = tuple(BUILDERS)  # the built-in heads


def load_export(name_or_path: str, **options: Any) -> RewardModel:
    """Any rmlab export (or HF reward model) with the right head: ``config.rmlab.head`` picks it."""
    head = read_export_meta(name_or_path).get("head") or "scalar"
    return build_model(head=head, name_or_path=name_or_path, **options)
