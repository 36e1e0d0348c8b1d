#!/usr/bin/env bash
# Reproduce docs/results.md: each experiment's 3-seed sweep, then its summary table and plot.
#   bash docs/results/run.sh bt_vs_logexp margin kwise      (one stream; run two streams on 2 cores)
# Sweeps land in outputs/results/<experiment>/; the summaries are copied to docs/results/<experiment>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
declare -A METRICS=(
  [bt_vs_logexp]="val/acc,val/loss,train/loss_epoch,val/ece"
  [margin]="val/acc,val/bucket_strength/0,val/bucket_strength/1,val/bucket_strength/2,val/bucket_strength/3,val/ece"
  [margin_alpaca]="val/acc,val/bucket_margin/q1,val/bucket_margin/q2,val/bucket_margin/q3,val/bucket_margin/q4,val/ece"
  [grouped_alpaca]="val/acc,train/acc_epoch,val/loss,train/loss_epoch,val/ece"
  [grouped]="val/acc,train/acc_epoch,val/loss,train/loss_epoch,val/ece"
  [epochs]="val/acc,train/acc_epoch,val/loss,val/ece"
  [kwise]="val/acc,val/truth/acc,val/loss"
  [heads]="val/acc,val/loss,val/truth/acc"
)
for exp in "$@"; do
  sweep=outputs/results/$exp
  rm -rf "$sweep"
  $PY train.py -m experiment="$exp" threads=1 hydra.sweep.dir="$sweep" > "outputs/results_$exp.log" 2>&1
  $PY -m rmlab.summarize "$sweep" --metrics "${METRICS[$exp]}" --out "docs/results/$exp"
done
