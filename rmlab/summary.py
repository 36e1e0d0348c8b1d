"""The end of one training run: ``metrics.json`` in the run dir and the lines printed to the terminal.

(``rmlab.summarize`` is the other direction: one table over many runs.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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
    if s.get("liger"):
        lines.append(f"  Liger kernels (model.liger)       {', '.join(s['liger']['kernels'])}")
    for k, v in (s.get("head_report") or {}).items():
        lines.append(f"  {k:<33} {v:.3f}")
    if s.get("export_dir"):
        lines.append(f"  exported model (transformers): {s['export_dir']}")
    if s.get("export_skipped"):
        lines.append(f"  export skipped: {s['export_skipped']}")
    lines.append(f"  next: python eval.py ckpt_path={s['run_dir']}/checkpoints/last.ckpt")
    if s.get("export_dir"):
        lines.append(f"        python -m rmlab.score <file.jsonl> --model {s['export_dir']}")
        lines.append("        in other tools: the export's config.json says how to read it (rmlab.read_with)")
    return "\n".join(lines)
