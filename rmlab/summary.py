"""The end of one training run: ``metrics.json`` in the run dir and the lines printed to the terminal.

(``rmlab.summarize`` is the other direction: one table over many runs.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def python_command() -> str:
    """How to call this Python in a printed ``next:`` line: ``python`` when that is this interpreter's ``python``
    (an activated venv, conda, a system install), else this interpreter's path, relative to the working dir when it
    is under it. ``make train`` runs ``.venv/bin/python`` without activating the venv: a bare ``python`` there is
    the system's, without rmlab's packages."""
    exe = Path(sys.executable).absolute()
    found = shutil.which("python")
    # The same folder (a venv's bin: python and python3 there are one program) and the same program (a system
    # bin's python may be another version than its python3)
    if found and Path(found).absolute().parent == exe.parent and os.path.realpath(found) == os.path.realpath(exe):
        return "python"
    try:
        rel = str(exe.relative_to(Path.cwd()))
    except ValueError:
        return shlex.quote(str(exe))
    return shlex.quote(rel if "/" in rel else f"./{rel}")  # bare, the shell would look `python` up on PATH


def run_summary(trainer, out: Path, minutes: float, baselines: dict[str, float]) -> dict[str, Any]:
    """The run's headline numbers and every scalar the trainer logged last."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {
        "run_dir": str(out),
        "val_acc": metrics.get("val/acc", float("nan")),
        "oracle_acc": baselines.get("oracle_acc", float("nan")),
        "length_acc": baselines.get("length_acc", float("nan")),
        "train_steps": int(trainer.global_step),
        "minutes": minutes,
        "metrics": metrics,
    }


def eval_args(cfg: Any) -> list[str]:
    """The overrides that make ``python eval.py ckpt_path=...`` score the run's own data and val split.

    eval.py's data defaults to the simulator with seed 0: a run on other data, another seed or other simulator
    settings would otherwise be scored on data it was not trained on (all of it, as no split matches). Each key
    that decides the examples (rmlab.evaluate's identity keys, the format options) or the rows (max_length) is
    named where the run's value differs from its data config file's."""
    data = cfg.get("data")
    if data is None or "name" not in data:
        return []
    name, args = str(data.name), []
    path = CONF_DATA / f"{name}.yaml"
    if name != "simulator":
        args.append(f"data={name}" if path.exists() else "data=<this run's data config>")
    seed = cfg.get("seed", 0)
    if seed not in (0, None):
        args.append(f"seed={seed}")
    if data.get("seed") is not None and data.get("seed") != seed:
        args.append(f"data.seed={data.seed}")
    if not path.exists():
        return args
    default = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    run = OmegaConf.to_container(data, resolve=True)

    def leaves(prefix: str, ours: Any, theirs: Any) -> None:
        if isinstance(ours, dict):
            theirs = theirs if isinstance(theirs, dict) else {}
            for k, v in ours.items():
                leaves(f"{prefix}.{k}", v, theirs.get(k))
        elif ours != theirs and not (isinstance(theirs, str) and "${" in theirs):
            args.append(f"{prefix}={hydra_list(ours) if isinstance(ours, list) else 'null' if ours is None else ours}")

    # The keys that pick the examples, then those that shape each row (the run's truncation, its K per prompt).
    for key in ("source", "simulator", "val_fraction", "format", "split", "val_split", "val_source", "fields", "format_options",
                "max_records", "max_length", "min_prompt_tokens"):
        if key in run:
            leaves(f"data.{key}", run[key], default.get(key))
    return args


_PLAIN = re.compile(r"[A-Za-z0-9_/.+:@%-]+")  # characters a value may hold bare, for Hydra's parser and for a shell


_OTHER_TYPE = re.compile(r"[-+]?(\d[\d_]*(\.\d*)?([eE][-+]?\d+)?|\.\d+|inf|nan)|true|false|null", re.IGNORECASE)


def _hydra_quoted(value: str) -> str:
    """``value`` in single quotes for Hydra's parser, which un-escapes only the backslashes before a quote or at the
    end: those are doubled (``C:\\dir\\x y`` stays as it is), then each quote escaped."""
    value = re.sub(r"\\+(?='|$)", lambda m: m.group(0) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def hydra_list(items: list) -> str:
    """A list value in Hydra's override syntax (``[instruction,input]``), each string element quoted unless plain, so
    that ``data.fields.prompt=[...]`` parses back to the same list."""
    def one(v: Any) -> str:
        if isinstance(v, list):
            return hydra_list(v)
        if v is None:
            return "null"
        if isinstance(v, str) and (not _PLAIN.fullmatch(v) or _OTHER_TYPE.fullmatch(v)):  # "1", "true": strings
            return _hydra_quoted(v)
        return str(v)

    return "[" + ",".join(one(v) for v in items) + "]"


def cli_override(arg: str) -> str:
    """``key=value`` as one shell word that Hydra parses back to the same string value.

    A sweep job's dir is named by its overrides (``0_loss=bt,seed=1``): bare, its ``=`` and ``,`` stop Hydra's
    override parser. Such a value is single-quoted for Hydra and the whole word double-quoted for the shell."""
    key, sep, value = arg.partition("=")
    if not sep or not value or _PLAIN.fullmatch(value) or value.startswith("<"):  # a <placeholder> stays as it is
        return arg
    if value.startswith("[") and value.endswith("]"):  # a list, already in Hydra's syntax (hydra_list): the shell's quotes only
        return shlex.quote(arg)
    word = key + "=" + _hydra_quoted(value)
    return f'"{word}"' if not re.search(r'["$`\\!]', word) else shlex.quote(word)


def write_summary(summary: dict[str, Any], out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    print(format_summary(summary), flush=True)


def format_summary(s: dict) -> str:
    def pct(x):
        return "  n/a " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"

    lines = [
        "",
        "rmlab run finished",
        f"  val accuracy (strict, ties apart) {pct(s['val_acc'])}",
        f"  oracle accuracy (true reward)     {pct(s['oracle_acc'])}",
        f"  length-only baseline              {pct(s['length_acc'])}",
        f"  steps {s['train_steps']}, {s['minutes']:.1f} min",
        f"  run dir: {s['run_dir']}",
    ]
    lm = (s.get("metrics") or {}).get("val/critique_lm")
    if lm is not None and s.get("critique_lm_uniform"):
        lines.append(f"  critique LM loss (val, nats/token) {lm:6.3f}  (a uniform guess: {s['critique_lm_uniform']:.3f})")
    if s.get("liger"):
        lines.append(f"  Liger kernels (model.liger)       {', '.join(s['liger']['kernels'])}")
    for k, v in (s.get("head_report") or {}).items():
        lines.append(f"  {k:<33} {v:.3f}")
    if s.get("export_dir"):
        lines.append(f"  exported model (transformers): {s['export_dir']}")
    if s.get("export_skipped"):
        lines.append(f"  export skipped: {s['export_skipped']}")
    extra = "".join(f" {cli_override(a)}" for a in s.get("eval_args") or [])  # the run's data and split (eval_args)
    ckpt = cli_override(f"ckpt_path={s['run_dir']}/checkpoints/last.ckpt")  # runs as printed in a sweep's job dir too
    py = python_command()
    lines.append(f"  next: {py} eval.py {ckpt}{extra}")
    if s.get("export_dir"):
        lines.append(f"        {py} -m rmlab.score <file.jsonl> --model {shlex.quote(str(s['export_dir']))}")
        lines.append("        in other tools: the export's config.json says how to read it (rmlab.read_with)")
    if s.get("wandb_offline"):
        wandb = "wandb" if py == "python" else f"{py} -m wandb"  # its CLI sits beside this python, like rmlab's
        lines.append(f"        wandb ran offline (no key): upload with  {wandb} sync {shlex.quote(str(s['wandb_offline']))}")
    return "\n".join(lines)
