"""The eval entry: score a dataset with a checkpoint or an exported model, write the report.

``eval.py`` at the root is the Hydra shim; tests call ``run(cfg)`` through the compose API.

Which model:
- ``ckpt_path=<run>/checkpoints/last.ckpt``: a Lightning checkpoint. The architecture comes from the
  run's ``config.yaml`` (next to ``checkpoints/``) so ``model=`` need not be repeated; without it,
  from ``cfg.model``.
- ``model.name_or_path=<run>/export`` (or any HF reward model directory): loaded with ``rmlab.models``
  (an rmlab export's ``config.rmlab`` says which head it is).

Which examples (``split``): ``val`` scores the held-out prompts of the data config, ``all`` scores
every group (for a dataset the model never trained on), ``auto`` picks ``val`` when the data config is
the one the model was trained on (so training prompts never inflate the score) and ``all`` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rmlab.checkpoint import CheckpointError, check_checkpoint, check_export_dir, read_checkpoint
from rmlab.data.simulator import SimulatorConfig
from rmlab.data.tokenize import contract_drift, format_drift
from rmlab.metrics import PredictionCollector, Predictions, compute_all
from rmlab.models import RewardModel, Scored, load_export, read_export_meta, score_batches
from rmlab.models.budget import token_budget
from rmlab.models.builder import find_head
from rmlab.models.ensemble import EnsembleRewardModel, member_stats
from rmlab.module import model_state
from rmlab.report import write_report
from rmlab.runtime import start_run
from rmlab.validate import check_config

log = logging.getLogger("rmlab")

# Data keys that decide which examples a data config yields; equal keys = the training data.
_DATA_IDENTITY = (
    "name",
    "source",
    "split",
    "val_source",
    "val_split",
    "val_fraction",
    "simulator",
    "format",
    "fields",
    "seed",
)


# The simulator's settings a data config leaves out take these values (compared by pick_split).
SIMULATOR_DEFAULTS = {k: v for k, v in vars(SimulatorConfig()).items() if k != "seed"}


def find_run_config(path: str | None) -> DictConfig | None:
    """The training run's resolved config.yaml for a checkpoint or an export dir inside a run dir."""
    if not path:
        return None
    p = Path(path).resolve()
    for d in (p.parent, p.parent.parent, p, p.parent.parent.parent):
        if (d / "config.yaml").exists() and (d / "config.yaml") != p:
            return OmegaConf.load(d / "config.yaml")
    return None


def trained_rows(model_path: str | None, run_cfg: DictConfig | None) -> dict[str, Any]:
    """How the model's training rows were built (the scoring contract): ``reward_token``, ``max_length`` and
    ``min_prompt_tokens``, from the training run's config when there is one, else from the export's
    ``config.rmlab.scoring`` (an export copied out of its run dir), else the defaults."""
    meta = read_export_meta(model_path).get("scoring", {}) if model_path and Path(model_path).is_dir() else {}
    data = run_cfg.get("data", {}) if run_cfg is not None else {}
    out = {"reward_token": "auto", "max_length": 512, "min_prompt_tokens": 16}
    for k in out:
        v = data.get(k) if data.get(k) is not None else meta.get(k)
        if v is not None:
            out[k] = v
    return out


def load_reward_model(ckpt_path: str | None = None, model_cfg: Any = None, run_cfg: DictConfig | None = None) -> RewardModel:
    """A reward model in eval mode from a Lightning checkpoint or from ``model_cfg`` (an export dir).

    For a checkpoint the architecture is built from the training run's model config (``run_cfg``)
    when there is one, then the weights are loaded strictly: a mismatch is an error, never silent.
    """
    if ckpt_path:
        arch = run_cfg.model if run_cfg is not None and "model" in run_cfg else model_cfg
        if arch is None:
            raise ValueError(f"no model config for {ckpt_path}: pass model=<the one it was trained with>")
        check_checkpoint(ckpt_path, arch)  # readable and of this architecture, before the model builds
        if arch is not model_cfg and isinstance(arch, DictConfig) and arch.get("liger"):
            # Liger is how the training run ran, not what the weights are: scoring follows this command's
            # model.liger (false by default), so a run trained with it on a GPU is scored on any machine.
            arch = arch.copy()
            arch.liger = bool(model_cfg.get("liger", False)) if model_cfg is not None else False
        wanted = model_cfg.get("generation") if arch is not model_cfg and model_cfg is not None else None
        if wanted is not None:
            # A writing model's generation settings may be changed at evaluation (+model.generation.samples=5, ...),
            # as for an export; they were ignored here, silently, for a checkpoint.
            if not isinstance(arch, DictConfig) or arch.get("generation") is None:
                raise ValueError(
                    f"model.generation is set, but the model of {ckpt_path} does not write before it scores (only "
                    f"model=cloud and model.reasoning=true judges do): drop the model.generation override"
                )
            arch = arch.copy()
            arch.generation = OmegaConf.merge(arch.generation, wanted)
        model = instantiate(arch, _convert_="all")
        state = read_checkpoint(ckpt_path)["state_dict"]  # weights_only: tensors and plain types only
        model.load_state_dict(model_state(state), strict=True)
    else:
        if model_cfg is None:
            raise ValueError("set ckpt_path=<checkpoint> or model.name_or_path=<export dir>")
        path = model_cfg.get("name_or_path")
        if path and Path(path).is_dir():
            check_export_dir(path)  # a half-written safetensors or a cut config.json: named, before loading
        with damage_named(path):
            if path and read_export_meta(path).get("head") not in (None, "scalar"):
                # An rmlab export of another head (verifier, judge, attributes) rebuilds itself from its config.json.
                # A writing model's generation settings may be changed at evaluation (model.generation.samples=5, ...).
                gen = {"generation": OmegaConf.to_container(model_cfg.generation)} if model_cfg.get("generation") else {}
                model = load_export(path, trust_remote_code=bool(model_cfg.get("trust_remote_code", False)), **gen)
            else:
                model = instantiate(model_cfg, _convert_="all")
    return model.eval()


@contextlib.contextmanager
def damage_named(path: str | None):
    """Loading an export dir that failed is checked thoroughly (every ``*.json`` decoded, the large tokenizer.json
    too, which ``check_export_dir`` only checks at its ends before loading): damage inside a file is then a
    ``CheckpointError`` naming it rather than the tokenizer library's message, which names no file."""
    try:
        yield
    except Exception:
        if path and Path(path).is_dir():
            check_export_dir(path, thorough=True)
        raise


def load_member(path: str) -> tuple[RewardModel, dict, DictConfig | None]:
    """(model in eval mode, export metadata, the training run's config or None) for one path: a Lightning
    checkpoint file (the architecture from its run's config.yaml) or an export dir / HF reward model."""
    run_cfg = find_run_config(path)
    if Path(path).is_file():
        model = load_reward_model(path, None, run_cfg)
        meta = read_export_meta(str(Path(path).resolve().parent.parent / "export"))
    else:
        if Path(path).is_dir():
            check_export_dir(path)
        meta = read_export_meta(path)
        try:
            find_head(meta.get("head") or "scalar")
        except ValueError as e:
            raise CheckpointError(
                f"{Path(path) / 'config.json'}: its rmlab record names a head this rmlab does not have ({e}). It was "
                f"exported by another rmlab version or with a plugin head: use that version, or import the plugin's "
                f"module (rmlab.models.<head>) before loading"
            ) from None
        with damage_named(path):
            model = load_export(path).eval()  # the export's config.json says which head it is
    return model, meta, run_cfg


def load_ensemble(paths: list[str], how: str = "mean", lam: float = 1.0) -> tuple[RewardModel, list[DictConfig | None]]:
    """One model for one path; an ``EnsembleRewardModel`` (rmlab.models.ensemble) over several, each member
    normalized by its export's val statistics. Returns the model and the members' run configs."""
    if not paths:
        raise ValueError("no model given: pass an export dir or a checkpoint")
    loaded = [load_member(p) for p in paths]
    if len(loaded) == 1:
        return loaded[0][0], [loaded[0][2]]
    stats = [member_stats(meta, p) for p, (_, meta, _) in zip(paths, loaded)]
    model = EnsembleRewardModel([m for m, _, _ in loaded], stats, how, lam, names=list(paths))
    return model.eval(), [c for _, _, c in loaded]


def score_loader(
    model: RewardModel,
    loader,
    keep_tokens: bool = False,
    device: str | None = None,
    progress: bool = False,
    scored: list[Scored] | None = None,
) -> Predictions:
    """The rewards of every response of ``loader`` as ``Predictions``; ``scored`` (a list) also receives each
    scored batch, for the model's own report."""
    col = PredictionCollector(keep_tokens=keep_tokens)
    for s in score_batches(model, loader, device=device, progress=progress):
        col.add(s.rewards, s.batch, s.heads.get("critique"))  # a writing model's generated critiques, else None
        if scored is not None:
            scored.append(s)
    return col.result()


def data_view(data_cfg: Any) -> dict[str, Any]:
    """A data config as plain values, its simulator's settings completed with their defaults (a run saved before a
    simulator key existed, e.g. hack_rate, had that key's default)."""
    d = OmegaConf.to_container(data_cfg, resolve=True)
    if isinstance(d.get("simulator"), dict):
        d["simulator"] = {**SIMULATOR_DEFAULTS, **d["simulator"]}
    return d


def pick_split(split: str, data_cfg: Any, run_cfg: DictConfig | None) -> str:
    if split in ("val", "all"):
        return split
    if split != "auto":
        raise ValueError(f"split must be auto|val|all, got {split!r}")
    if run_cfg is None or "data" not in run_cfg:
        return "all"
    a, b = data_view(data_cfg), data_view(run_cfg.data)
    same = all(a.get(k) == b.get(k) for k in _DATA_IDENTITY)
    return "val" if same else "all"


def ensemble_split_leak(members: list[str], run_cfgs: list[DictConfig | None], data_cfg: Any) -> str | None:
    """An ensemble's ``split=auto`` is the first member's val split. A member trained on another split of the same
    data (another seed: the split follows it) had part of that val set as training data; say which, and how to
    train members that share one held-out set. A member trained on other data (another name or source, or the
    simulator at another seed or setting: other examples) never saw these. None when no member can have trained on
    this val set."""
    def examples(d: dict) -> tuple:  # what decides the examples themselves, the split aside
        if d.get("source") != "simulator":  # a file's records are the same at any seed; the seed splits them
            return d.get("name"), d.get("source")
        # The simulator generates other examples at another seed: a member at seed 2 never saw seed 1's
        return d.get("name"), d.get("source"), d.get("simulator"), d.get("seed")

    def held_out(d: dict) -> tuple:  # what picks the val set among those examples
        if d.get("val_source") or d.get("val_split"):  # a split of its own (hub data's test split): not the seed's
            return d.get("val_source"), d.get("val_split"), d.get("split")
        return d.get("val_fraction"), d.get("seed"), d.get("split")

    here, same_data, unknown = data_view(data_cfg), [], []
    for m, rc in zip(members[1:], run_cfgs[1:]):
        if rc is None or "data" not in rc:
            unknown.append(m)
        elif examples(theirs := data_view(rc.data)) == examples(here) and held_out(theirs) != held_out(here):
            same_data.append(m)
    if not same_data and not unknown:
        return None
    said = []
    if same_data:
        said.append(f"{', '.join(same_data)} trained on another split of this data (another seed or split setting): "
                    f"part of this val set was their training data")
    if unknown:
        said.append(f"{', '.join(unknown)} {'has' if len(unknown) == 1 else 'have'} no training run config beside "
                    f"{'it' if len(unknown) == 1 else 'them'}, so whether they trained on this val set is unknown")
    return (f"split=val is the val split of the first member ({members[0]}), but " + "; ".join(said) + ". The "
            "ensemble's numbers here may be optimistic. Train the members with one data.seed (e.g. `python train.py "
            "-m seed=1,2,3 data.seed=0`: the init varies, the split does not, as in experiment=overopt), or "
            "evaluate on data none of them trained on.")


def run(cfg: DictConfig) -> dict[str, Any]:
    if cfg.get("benchmark"):
        raise ValueError("benchmark= is run by rmlab.benchmarks.runner.run (eval.py picks it); this is the data= eval")
    check_config(cfg, entry="eval")  # bad settings fail here, named, before anything loads
    out, t0 = start_run(cfg, resolve=False)

    ckpt = cfg.get("ckpt_path")
    name_or_path = OmegaConf.select(cfg, "model.name_or_path", throw_on_missing=False)
    torch.manual_seed(int(cfg.get("seed") or 0))  # a head that is not in the weights (model=minilm) starts the same each time
    members = OmegaConf.select(cfg, "ensemble.members", default=None)
    if members:  # several models scored as one (rmlab.models.ensemble); the first member's run gives the split
        members = [str(m) for m in members]
        model, run_cfgs = load_ensemble(members, str(cfg.ensemble.combine), float(cfg.ensemble.lam))
        run_cfg, name_or_path = run_cfgs[0], f"ensemble {cfg.ensemble.combine} of {', '.join(members)}"
        first = members[0]
    else:
        run_cfg = find_run_config(ckpt or name_or_path)
        model = load_reward_model(ckpt, cfg.model, run_cfg)
        first = ckpt or name_or_path
    # Rows as the model was trained on them (the scoring contract): its reward_token unless this run names one.
    trained = trained_rows(first, run_cfg)["reward_token"]
    if cfg.data.get("reward_token", "auto") == "auto" and trained != "auto":
        log.info("data.reward_token=%s, as the model was trained", trained)
        cfg.data.reward_token = trained
    drift = contract_drift(model.tokenizer, model.recorded_scoring(), cfg.data.get("reward_token", "auto"))
    if drift and cfg.data.get("format") != "chat":
        log.warning(drift)
    plain = format_drift(model.recorded_scoring(), cfg.data.get("format") == "chat")
    if plain:
        log.warning(plain)
    # Generative heads re-template each group into their own rows, exactly as in training.
    dm = instantiate(cfg.data, tokenizer=model.tokenizer, output_dir=str(out), template=model.group_template,
                     _convert_="all")
    dm.layout = model.batch_layout  # the collator builds the model's packed layout (set here: Hydra would convert it)
    if dm.batches.max_tokens == "auto":  # as in training (rmlab.models.budget)
        dm.batches.max_tokens = token_budget(model, dm.rows.max_length)
        dm.batches.budget = "packed"
    dm.setup("validate")
    split = pick_split(cfg.split, cfg.data, run_cfg)
    leak = ensemble_split_leak(members, run_cfgs, cfg.data) if members and split == "val" else None
    if leak:
        log.warning(leak)
    groups = dm.val_groups if split == "val" else dm.train_groups + dm.val_groups
    if not groups:
        raise ValueError(f"no groups to evaluate in split={split!r} of data={cfg.data.name}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scored: list[Scored] = []
    pred = score_loader(model, dm.eval_loader(groups), keep_tokens=True, device=device, progress=True, scored=scored)
    sections = OmegaConf.to_container(cfg.sections, resolve=True) if cfg.get("sections") else None
    result = compute_all(pred, sections=sections, n_bins=int(cfg.n_bins))
    # The model's own diagnostics (judge position bias, attribute correlations), from the same scores.
    result.scalars.update({f"head/{k}": v for k, v in model.head_report(scored).items()})
    info = {
        "model": str(ckpt or name_or_path),
        "data": cfg.data.name,
        "split": split,
        "groups": len(groups),
        "responses": int(pred.reward.size),
        "seconds": round(time.time() - t0, 2),
        "run_dir": str(out),
    }
    if leak:
        info["split_warning"] = leak
    summary = write_report(out, result, pred, info, tokenizer=model.tokenizer, worst_k=int(cfg.worst_k))
    print(summary, flush=True)
    return {"metrics": result.scalars, "info": info}
