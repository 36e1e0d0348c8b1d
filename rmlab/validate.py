"""Config validation before anything heavy loads: ``check_config(cfg, entry)`` is the first line of
``rmlab.train.run`` and ``rmlab.evaluate.run``.

It checks the types, ranges and cross-field rules of the composed config (module, trainer, data, loss, model
and the top-level keys) and raises one ``ConfigError`` listing every failure, each as
``<key as typed on the command line>=<bad value>: <what is valid>``. Nothing is built or read: no model,
tokenizer, data file or run dir. Settings that are valid but likely unintended (``data.val_fraction=0`` with
no separate validation data) are logged as warnings and returned.

Checks are skipped for keys a config does not have (an eval config has no trainer), so a group of your own
is never refused for lacking a key.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from rmlab.data.formats import ADAPTERS
from rmlab.data.layout import KERNELS
from rmlab.data.tokenize import REWARD_TOKENS
from rmlab.models.base import ENCODER_TYPES
from rmlab.models.builder import BUILDERS, find_head
from rmlab.models.ensemble import COMBINES
from rmlab.models.packing import MODES
from rmlab.overrides import owning_group

log = logging.getLogger("rmlab")

# The tokenizer adds at most this many special tokens to a row (rmlab.data.tokenize.special_tokens):
# start ([CLS]/BOS), a separator between prompt and response, and an end token.
MAX_SPECIAL_TOKENS = 3
SEED_LIMIT = 2**32  # numpy's seed range; Lightning's seed_everything refuses values outside it

_ABSENT = object()


@dataclass(frozen=True)
class Problem:
    key: str  # as typed on the command line, e.g. module.lr
    value: Any
    expected: str  # what is valid: a range, a set, an example

    def __str__(self) -> str:
        return f"{self.key}={typed(self.value)}: {self.expected}"


class ConfigError(ValueError):
    """One or more bad settings, each naming its key, the bad value and what is valid.

    ``problems`` holds each failure; the message lists them all, one a line."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = str(self.problems[0])
        else:
            msg = f"{len(self.problems)} settings are invalid:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(msg)


def typed(value: Any) -> str:
    """A value as one would type it in an override: null, true, 1e-05, abc, [0.9, 0.999]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and value.strip() == value and " " not in value else repr(value)
    if OmegaConf.is_config(value):
        return str(OmegaConf.to_container(value, resolve=False))
    return str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    """Reads keys of the config (resolving interpolations one key at a time) and collects problems."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.problems: list[Problem] = []
        self.warnings: list[str] = []

    def fail(self, key: str, value: Any, expected: str) -> None:
        self.problems.append(Problem(key, value, expected))

    def get(self, key: str) -> Any:
        """The resolved value of ``key``; ``_ABSENT`` when the config has no such key or it cannot be read
        (a required ``???`` or a broken interpolation is recorded as a problem)."""
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(self.cfg, parent_key, default=None) if parent_key else self.cfg
        if not isinstance(parent, DictConfig) or leaf not in parent.keys():  # `in parent` is False for ???
            return _ABSENT
        if OmegaConf.is_missing(parent, leaf):
            self.fail(key, "???", f"is required; set {key}=<value>")
            return _ABSENT
        try:
            value = parent[leaf]
        except MissingMandatoryValue as e:  # an interpolation to a ??? key
            self.fail(key, OmegaConf.to_container(parent)[leaf], f"refers to a required key that is not set ({e.msg})")
            return _ABSENT
        except OmegaConfBaseException as e:
            raw = OmegaConf.to_container(parent, resolve=False)[leaf]
            self.fail(key, raw, f"cannot be resolved: {str(e).splitlines()[0]}")
            return _ABSENT
        return value

    # ---------------------------------------------------------------- kinds of value
    def integer(self, key: str, minimum: int | None = None, *, also: tuple = (), none_ok: bool = False,
                hint: str = "") -> Any:
        """An integer >= minimum, or one of ``also`` (e.g. -1 = no limit), or null when ``none_ok``."""
        v = self.get(key)
        if v is _ABSENT or (v is None and none_ok) or (_is_int(v) and v in also):
            return v
        allowed = " or ".join([*(str(a) for a in also), *([f">= {minimum}"] if minimum is not None else [])])
        expected = "must be an integer" + (f": {allowed}" if allowed else "") + (" (or null)" if none_ok else "")
        if not _is_int(v) or (minimum is not None and v < minimum):
            self.fail(key, v, expected + (f"; {hint}" if hint else ""))
            return _ABSENT
        return v

    def number(self, key: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
               high_open: bool = False, none_ok: bool = False, hint: str = "") -> Any:
        """A finite number in [low, high] (an open end with ``*_open``), or null when ``none_ok``."""
        v = self.get(key)
        if v is _ABSENT or (v is None and none_ok):
            return v
        ok = _is_number(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            if low is not None and high is not None:
                rng = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            elif low is not None:
                rng = f"{'>' if low_open else '>='} {low}"
            elif high is not None:
                rng = f"{'<' if high_open else '<='} {high}"
            else:
                rng = "finite"
            self.fail(key, v, f"must be a number {rng}" + (" (or null)" if none_ok else "")
                      + (f"; {hint}" if hint else ""))
            return _ABSENT
        return v

    def choice(self, key: str, options: tuple, *, none_ok: bool = False) -> Any:
        v = self.get(key)
        if v is _ABSENT or (v is None and none_ok):
            return v
        if v not in options or isinstance(v, bool):
            self.fail(key, v, f"must be one of {' | '.join(map(str, options))}" + (" (or null)" if none_ok else ""))
            return _ABSENT
        return v

    def boolean(self, key: str) -> Any:
        v = self.get(key)
        if v is not _ABSENT and not isinstance(v, bool):
            self.fail(key, v, "must be true or false")
            return _ABSENT
        return v


# -------------------------------------------------------------------- the groups
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@functools.cache
def known_top_keys(entry: str) -> frozenset[str]:
    """The top-level keys rmlab's own configs can give ``entry``'s config: ``conf/<entry>.yaml``'s, each config
    group's name, and what the ``_global_`` files (experiment, debug, hparams_search, the SLURM launcher) set at the
    top."""
    keys = set(OmegaConf.load(CONF_DIR / f"{entry}.yaml").keys())
    keys.update(group.name for group in CONF_DIR.iterdir() if group.is_dir())
    for f in CONF_DIR.rglob("*.yaml"):  # hydra/launcher/slurm.yaml too: its top-level slurm table
        header = [line for line in f.read_text().splitlines()[:5] if line.startswith("#")]
        if any(line.replace(" ", "") == "#@package_global_" for line in header):
            keys.update(OmegaConf.load(f).keys())
    return frozenset(str(k) for k in keys) - {"defaults", "hydra"}


def _check_unread_top_keys(c: _Checker, entry: str) -> None:
    """``python train.py +lr=1``: Hydra adds a top-level ``lr`` that nothing reads, and the run trains at
    module.lr as if nothing was said. Warned (not refused: a config dir of your own may add top-level keys that
    your code reads), with the key it likely meant."""
    known = known_top_keys(entry)
    for key in c.cfg.keys():
        if key in known:
            continue
        close = owning_group(str(key), c.cfg) or difflib.get_close_matches(str(key), sorted(known), n=1)
        guess = f" Did you mean {close[0]}?" if close else ""
        c.warnings.append(f"{key}: nothing in rmlab reads a top-level `{key}` (added with +{key}=...), so it has no "
                          f"effect.{guess}")


def _check_top(c: _Checker, entry: str) -> None:
    _check_unread_top_keys(c, entry)
    seed = c.integer("seed", 0, none_ok=True, hint=f"a seed is in [0, 2**32 - 1 = {SEED_LIMIT - 1}], e.g. seed=0")
    if _is_int(seed) and seed >= SEED_LIMIT:
        c.fail("seed", seed, f"must be < 2**32 = {SEED_LIMIT}; e.g. seed=0")
    c.integer("threads", 1, none_ok=True, hint="null = torch's default (all cores), e.g. threads=1")
    ckpt = c.get("ckpt_path")
    if ckpt not in (_ABSENT, None):
        special = ("last",) if entry == "train" else ()
        if not isinstance(ckpt, str) or not ckpt:
            c.fail("ckpt_path", ckpt, "must be a checkpoint path" + (", `last` or null" if special else " or null"))
        elif ckpt not in special and "://" not in ckpt and not os.path.exists(ckpt):
            c.fail("ckpt_path", ckpt, "no such file or directory"
                   + ("; use ckpt_path=last to resume this run dir, or null to start fresh" if special else ""))
    if entry == "train":
        c.boolean("export")
    else:
        c.choice("split", ("auto", "val", "all"))
        c.integer("n_bins", 1)
        c.integer("worst_k", 0)
        members = c.get("ensemble.members")
        if members not in (_ABSENT, None):
            if not OmegaConf.is_list(members) or len(members) < 2 or not all(isinstance(m, str) for m in members):
                c.fail("ensemble.members", members, "must be a list of 2 or more export dirs or checkpoints, e.g. "
                       "ensemble.members=[runA/export,runB/export]; null scores the one model")
            c.choice("ensemble.combine", COMBINES)
            c.number("ensemble.lam", 0, hint="uwo's lambda, e.g. 1.0")
        elif ckpt in (_ABSENT, None) and _no_model(c):
            c.fail("model.name_or_path", None, "no model to evaluate: set ckpt_path=<checkpoint>, "
                   "model.name_or_path=<export dir> or ensemble.members=[<export>,<export>,...]")


def _check_module(c: _Checker) -> None:
    c.number("module.lr", 0, low_open=True, hint="e.g. module.lr=1e-4 (MiniLM-sized) or 1e-5..5e-5 (1B+)")
    c.number("module.weight_decay", 0, hint="e.g. module.weight_decay=0.01")
    c.number("module.eps", 0, low_open=True, hint="e.g. module.eps=1e-8")
    c.number("module.warmup_ratio", 0, 1, high_open=True, hint="a share of the steps, e.g. 0.05")
    c.number("module.min_lr_ratio", 0, 1, hint="the schedule's floor as a share of lr, e.g. 0.1")
    c.choice("module.scheduler", ("cosine", "linear", "constant"))
    betas = c.get("module.betas")
    if betas is not _ABSENT:
        seq = list(betas) if OmegaConf.is_list(betas) or isinstance(betas, (list, tuple)) else None
        if seq is None or len(seq) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in seq):
            c.fail("module.betas", betas, "must be two numbers in [0, 1), e.g. module.betas=[0.9,0.999]")


def _check_trainer(c: _Checker) -> None:
    steps = c.integer("trainer.max_steps", 1, also=(-1,), hint="-1 = no step limit (run the epochs), e.g. 100")
    epochs = c.integer("trainer.max_epochs", 1, also=(-1,), none_ok=True, hint="e.g. trainer.max_epochs=1")
    if steps == -1 and epochs == -1:
        c.fail("trainer.max_epochs", -1, "with trainer.max_steps=-1 training never ends (and the lr schedule has no "
               "length); set trainer.max_epochs>=1 or trainer.max_steps>0")
    c.integer("trainer.accumulate_grad_batches", 1, hint="batches per optimizer step, e.g. 1")
    precision = c.get("trainer.precision")
    if str(precision) in ("16-mixed", "16") and c.get("trainer.accelerator") == "cpu":
        c.fail("trainer.precision", precision, "fp16 mixed precision does not run on CPU (Lightning swaps in "
               "bf16-mixed with a warning): set trainer.precision=bf16-mixed or 32-true, or train on a GPU "
               "(trainer=gpu)")
    c.integer("trainer.log_every_n_steps", 1)
    c.integer("trainer.check_val_every_n_epoch", 1, none_ok=True)
    c.integer("trainer.num_sanity_val_steps", 0, also=(-1,))
    c.number("trainer.gradient_clip_val", 0, none_ok=True, hint="0 or null = no clipping, e.g. 1.0")
    v = c.get("trainer.val_check_interval")
    if v not in (_ABSENT, None):
        ok = (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)
        if not ok:
            c.fail("trainer.val_check_interval", v, "must be a float in (0, 1] (a share of an epoch) or an integer "
                   ">= 1 (every N batches); e.g. 1.0")


def _check_data(c: _Checker, entry: str) -> None:
    if not isinstance(c.cfg.get("data"), DictConfig):
        return
    c.get("data.source")  # ??? is reported as required
    c.choice("data.on_error", ("raise", "skip"))
    c.choice("data.padding_side", ("left", "right"))
    c.choice("data.pair_batching", ("grouped", "shuffled"))
    c.integer("data.max_records", 1, none_ok=True, hint="null = every record")
    c.integer("data.max_train_prompts", 1, none_ok=True, hint="null = every training prompt")
    c.integer("data.max_groups", 1, none_ok=True, hint="null = only the token and row budgets")
    c.integer("data.max_responses", 2, hint="a comparison needs two rows in one batch, e.g. 32")
    c.integer("data.num_workers", 0)
    c.boolean("data.cache")
    c.boolean("data.sort_by_length")
    c.choice("data.format", tuple(ADAPTERS))
    reward_token = c.choice("data.reward_token", REWARD_TOKENS)
    if reward_token == "last" and c.get("model.head") in ("verifier", "judge"):
        c.fail("data.reward_token", reward_token, "a generative head reads its answer just before the row's eos; "
               "use data.reward_token=auto (or eos) with model.head=verifier|judge")

    # A row holds the kept prompt, up to MAX_SPECIAL_TOKENS special tokens and at least one response token.
    mpt = c.integer("data.min_prompt_tokens", 0, hint="e.g. 16")
    max_len = c.integer("data.max_length", 1, hint="tokens per row, e.g. 512")
    if _is_int(mpt) and _is_int(max_len) and max_len <= mpt + MAX_SPECIAL_TOKENS:
        need = mpt + MAX_SPECIAL_TOKENS + 1
        c.fail("data.max_length", max_len, f"must be >= data.min_prompt_tokens ({mpt}) + {MAX_SPECIAL_TOKENS} special "
               f"tokens + 1 response token = {need}; raise it (e.g. data.max_length={max(512, need)}) or lower "
               "data.min_prompt_tokens")
    max_tokens = c.get("data.max_tokens")  # auto: sized to the device when the model is built (rmlab.models.budget)
    if max_tokens != "auto":
        max_tokens = c.integer("data.max_tokens", 1, hint="tokens per batch, e.g. 8192, or auto")
    if _is_int(max_tokens) and _is_int(max_len) and max_tokens < max_len:
        c.fail("data.max_tokens", max_tokens, f"must be >= data.max_length ({max_len}) so one row fits a batch; "
               f"e.g. data.max_tokens={max(8192, 16 * max_len)}")

    # Validation data: a separate source or split, else val_fraction of the prompts.
    separate = any(c.get(k) not in (_ABSENT, None, "") for k in ("data.val_source", "data.val_split"))
    frac = c.number("data.val_fraction", 0, 1, high_open=True,
                    hint="the share of prompts held out for validation, e.g. 0.1") if not separate else _ABSENT
    if frac == 0:
        if entry == "train":
            c.warnings.append(
                "data.val_fraction=0 and no data.val_source / data.val_split: no prompt is held out, so no "
                "validation will run (no val/acc, no val-based checkpoints or export statistics). Set "
                "data.val_fraction=0.1 (a share of the prompts) or data.val_source=<file> to validate."
            )
        elif c.get("split") == "val":
            c.fail("data.val_fraction", frac, "with split=val there is nothing to evaluate; set split=all or "
                   "data.val_fraction>0 (as in training)")

    gbc = c.integer("data.global_batch_comparisons", 1, none_ok=True, hint="null = no cap")
    if _is_int(gbc):
        accum = c.get("trainer.accumulate_grad_batches")
        devices, nodes = c.get("trainer.devices"), c.get("trainer.num_nodes")
        parts = accum if _is_int(accum) and accum >= 1 else 1
        known = "accumulation steps"
        if _is_int(devices) and devices >= 1:
            parts *= devices * (nodes if _is_int(nodes) and nodes >= 1 else 1)
            known = "ranks x accumulation steps"
        if gbc % parts:
            c.fail("data.global_batch_comparisons", gbc, f"must divide by the {known} ({parts}); use a multiple "
                   f"of {parts}, e.g. {parts * max(1, gbc // parts)}")

    if c.get("data.source") == "simulator":
        _check_simulator(c)


def _check_simulator(c: _Checker) -> None:
    c.integer("data.simulator.num_prompts", 1, hint="groups generated (train + val), e.g. 2400")
    k = c.integer("data.simulator.k", 2, hint="responses per prompt, e.g. 3")
    k_max = c.integer("data.simulator.k_max", 2, none_ok=True)
    if _is_int(k) and _is_int(k_max) and k_max < k:
        c.fail("data.simulator.k_max", k_max, f"must be >= data.simulator.k ({k}) or null")
    c.choice("data.simulator.comparisons", ("all", "adjacent", "one", "ranking"))
    c.number("data.simulator.temperature", 0, low_open=True, hint="annotator noise, e.g. 0.5")
    c.number("data.simulator.tie_band", 0, hint="e.g. 0.15; 0 = no ties")
    c.number("data.simulator.hack_rate", 0, 1, hint="share of flattering responses, e.g. 0.2; 0 = off")
    c.number("data.simulator.hack_strength", hint="annotators' bonus per flattering sentence, e.g. 1.0")


def _check_loss(c: _Checker) -> None:
    if not isinstance(c.cfg.get("loss"), DictConfig):
        return
    c.choice("loss.balance", ("none", "group"))
    c.choice("loss.center", ("pair", "group"))
    c.number("loss.center_coef", 0, hint="0 = no centering, e.g. 0.01")
    target, head = c.get("loss._target_"), c.get("model.head")
    if isinstance(target, str) and target.endswith(".AttributeLoss") and head not in (_ABSENT, "attributes"):
        c.fail("model.head", head, "must be attributes with loss=attributes (it trains per-attribute outputs): "
               "use model=attributes (or model.head=attributes), or another loss")
    if isinstance(target, str) and target.endswith(".OdinLoss") and head not in (_ABSENT, "odin"):
        c.fail("model.head", head, "must be odin with loss=odin (it trains a quality and a length head): "
               "use model=odin (or model.head=odin on a scalar model), or another loss")
    per_row = {".RegressionLoss": "a score", ".PlackettLuceLoss": "a rank"}
    need = next((v for k, v in per_row.items() if isinstance(target, str) and target.endswith(k)), None)
    if need and head == "judge":
        c.fail("model.head", head, f"the pairwise judge reads two responses per row, and this loss needs {need} per "
               "response: use loss=answer_ce (or loss=head_default) or a pairwise loss such as loss=bt, or "
               "model=tiny_llama for a per-response reward")
    if isinstance(target, str) and target.endswith(".GRMLoss"):
        _check_grm_model(c, head)


def _check_grm_model(c: _Checker, head: Any) -> None:
    """GRM's LM loss runs through the scalar head's causal-LM path: encoders and the other heads are refused here,
    before anything loads (a hub encoder not named here is refused when the model is built)."""
    if head not in (_ABSENT, "scalar"):
        c.fail("model.head", head, "loss=grm trains a language-modelling loss through the scalar head's backbone: use "
               "model.head=scalar on a causal LM, or another loss")
    name, model_type = c.get("model.name_or_path"), c.get("model.config.model_type")
    if _is_encoder(c):
        c.fail("model" if name == "minilm" else "model.config.model_type", name if name == "minilm" else model_type,
               "loss=grm needs a causal LM (it trains the backbone's language-modelling head on the chosen response) "
               "and this model is an encoder: use model=tiny_llama or model=hf model.name_or_path=<a causal LM>")


def _no_model(c: _Checker) -> bool:
    """True when the model config names no weights and no config to build from (model=hf without a name)."""
    model = c.cfg.get("model")
    if not isinstance(model, DictConfig) or "name_or_path" not in model.keys():
        return False
    missing = OmegaConf.is_missing(model, "name_or_path")
    return (missing or model.name_or_path in (None, "")) and OmegaConf.select(model, "config", default=None) is None


def _registered_head(head: Any) -> bool:
    """Known to the builder's registry, so a head added as rmlab/models/<name>.py passes too."""
    try:
        return isinstance(head, str) and find_head(head) is not None
    except ValueError:
        return False


def _check_model(c: _Checker) -> None:
    if not isinstance(c.cfg.get("model"), DictConfig):
        return
    if _no_model(c):
        c.fail("model.name_or_path", None, "no model to build: set model.name_or_path=<hub name or local dir> "
               "(or model.config=<a transformers config> for random weights)")
    head = c.get("model.head")
    if head is not _ABSENT and not _registered_head(head):
        c.fail("model.head", head, f"must be one of {' | '.join(sorted(BUILDERS))} or a head registered in "
               "rmlab/models/<name>.py (docs/heads.md)")
    mode = c.choice("model.forward_mode", ("auto", *MODES))
    attention = c.choice("model.attention", ("auto", *KERNELS))
    budget = c.choice("data.budget", ("padded", "packed"))
    _check_speed_keys(c, head, mode, attention, budget)
    c.integer("model.lora.r", 0, hint="0 = full fine-tuning, 8-64 typical")
    if c.boolean("model.liger") is True:
        if _is_encoder(c):
            c.fail("model.liger", True, "Liger's kernels (RMSNorm, RoPE, SwiGLU) are for decoder LMs and this model is "
                   "an encoder: set model.liger=false, or use a causal LM (model=tiny_llama, model=hf ...)")
        elif c.get("trainer.accelerator") == "cpu":
            c.fail("model.liger", True, "Liger's kernels are Triton kernels for a GPU and trainer.accelerator=cpu (the "
                   "default trainer=cpu): use trainer=gpu (or ddp, fsdp, deepspeed), or set model.liger=false")


def _is_encoder(c: _Checker) -> bool:
    """The bundled MiniLM, or a model config of an encoder type (a hub encoder not named here is found when built)."""
    return c.get("model.name_or_path") == "minilm" or c.get("model.config.model_type") in ENCODER_TYPES


# Heads whose forward is always padded: no packed layout for the collator (RewardModel.batch_layout stays None).
PADDED_HEADS = ("attributes", "verifier", "judge", "cloud")


def _check_speed_keys(c: _Checker, head: Any, mode: Any, attention: Any, budget: Any) -> None:
    """Speed settings that would be ignored, or that cannot train, are refused rather than run silently without
    them (found by an all-pairs sweep over the config groups)."""
    encoder = _is_encoder(c)
    if head == "attributes":  # the attribute head always runs padded and uncompiled (rmlab.models.builder)
        for key, value, off in (("model.forward_mode", mode, ("auto", "padded")), ("model.attention", attention,
                                ("auto",)), ("model.compile", c.get("model.compile"), (False, _ABSENT))):
            if value not in (_ABSENT, *off):
                c.fail(key, value, f"model.head=attributes always runs padded and uncompiled (its gate reads the "
                       f"prompt's hidden state), so {key} would be ignored: set "
                       f"{key}={'false' if key == 'model.compile' else 'auto'} (the default) or use model.head=scalar")
    elif encoder and mode in ("packed", "prefix_shared"):  # rmlab.models.packing.resolve_forward_mode
        c.fail("model.forward_mode", mode, "this model is an encoder, which always runs padded (its bidirectional "
               "attention would make a shared prefix depend on its responses), so it would be ignored: set "
               "model.forward_mode=auto (the default), or use a causal LM (model=tiny_llama, model=hf ...)")
    padded = mode == "padded" or (encoder and head != "attributes")
    if attention not in (_ABSENT, "auto") and head != "attributes":
        if padded:
            c.fail("model.attention", attention, "picks the packed modes' kernel and this model runs padded "
                   "(model.forward_mode=padded, or an encoder), so it would be ignored: set model.attention=auto, "
                   "or model.forward_mode=auto|packed|prefix_shared on a causal LM")
        elif c.get("model.attn_implementation") not in (_ABSENT, "sdpa"):
            c.fail("model.attention", attention, f"picks the kernel of rmlab's packed attention, which replaces sdpa "
                   f"only; with model.attn_implementation={c.get('model.attn_implementation')} it would be ignored: "
                   "set model.attention=auto, or model.attn_implementation=sdpa")
    if attention == "flex" and c.get("trainer.accelerator") == "cpu":
        c.fail("model.attention", attention, "FlexAttention has no backward pass on CPU (torch raises "
               "NotImplementedError at the first step) and trainer.accelerator=cpu: set model.attention=auto "
               "(sdpa on CPU) or sdpa, or train on a GPU (trainer=gpu)")
    if budget == "packed" and (padded or head in PADDED_HEADS):
        c.fail("data.budget", budget, "counts packed tokens, and this model runs padded (model.forward_mode=padded, "
               f"an encoder, or model.head={'|'.join(PADDED_HEADS)}), so it would count padded tokens anyway: set "
               "data.budget=padded, or model.forward_mode=auto|packed|prefix_shared on a causal LM's scalar head")


def _check_class_keys(c: _Checker, entry: str) -> None:
    """A key that the class a node builds does not take (``+module.lrr=1``, ``+trainer.max_stepz=3``) is named
    with the valid ones, where instantiating it would stop with a bare TypeError. Classes that take ``**kwargs``
    and targets that cannot be imported here are left to their own checks."""
    paths = ["module", "trainer"] if entry == "train" else []
    for group in ("callbacks", "logger") if entry == "train" else ():
        node = c.cfg.get(group)
        if isinstance(node, DictConfig):
            paths += [f"{group}.{k}" for k in node.keys()]
    for path in paths:
        node = OmegaConf.select(c.cfg, path, default=None)
        if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
            continue
        try:
            params = inspect.signature(get_object(node["_target_"])).parameters
        except Exception:  # noqa: BLE001 - not importable here, or no signature: nothing to compare with
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        raw = OmegaConf.to_container(node, resolve=False)
        valid = sorted(k for k in params if k != "self")
        for key in (k for k in raw if not str(k).startswith("_") and k not in params):
            close = difflib.get_close_matches(str(key), valid, n=1)
            guess = f"did you mean {path}.{close[0]}? " if close else ""
            c.fail(f"{path}.{key}", raw[key], f"not an argument of {node['_target_']}; {guess}valid: {', '.join(valid)}")


def check_or_exit(cfg: DictConfig, entry: str) -> None:
    """train.py's and eval.py's first step, before Lightning and transformers load: a bad setting stops the command in
    seconds with ``rmlab: bad config: ...`` and no traceback. run() checks again and logs the warnings."""
    try:
        check_config(cfg, entry=entry, log_warnings=False)
    except ConfigError as e:
        raise SystemExit(f"rmlab: bad config: {e}") from None


def check_config(cfg: DictConfig, entry: str = "train", log_warnings: bool = True) -> list[str]:
    """Check the composed config of ``entry`` (``train`` or ``eval``) before anything is built.

    Raises one ``ConfigError`` naming every bad setting; returns the warnings and logs them unless
    ``log_warnings=False`` and the config is good (train.py and eval.py check first, then run() checks again and
    says them once; a bad config stops at the first check, which says them)."""
    if entry not in ("train", "eval"):
        raise ValueError(f"entry must be train|eval, got {entry!r}")
    c = _Checker(cfg)
    _check_top(c, entry)
    if entry == "train":
        _check_module(c)
        _check_trainer(c)
        _check_loss(c)
        _check_model(c)
    _check_data(c, entry)
    if not c.problems:  # last: it imports the classes (Lightning's Trainer, ~6 s); a bad value fails before that
        _check_class_keys(c, entry)
    for w in c.warnings if log_warnings or c.problems else ():  # a run that stops here never checks again: say them
        log.warning("%s", w)
    if c.problems:
        # The same key can be reached twice (e.g. a ??? read by two checks): report it once.
        seen, unique = set(), []
        for p in c.problems:
            if (p.key, p.expected) not in seen:
                seen.add((p.key, p.expected))
                unique.append(p)
        raise ConfigError(unique)
    return c.warnings
