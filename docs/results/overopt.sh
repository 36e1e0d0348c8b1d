#!/usr/bin/env bash
# Reproduce docs/results.md#overopt: each loss over 3 seeds on the hackable simulator (experiment=overopt),
# then best-of-n on every model and on the ensembles of the BT seeds, then one table and one plot.
#   bash docs/results/overopt.sh
#   LOSSES="bt odin" EXTRA_odin=model.head=odin ROOT_DIR=outputs/results/overopt_odin \
#     DOCS_DIR=docs/results/overopt_odin bash docs/results/overopt.sh     # the ODIN arm (docs/results.md)
#   EXTRA_bt=model=tiny_llama EXTRA_grm=model=tiny_llama LOSSES="bt grm" ROOT_DIR=outputs/results/overopt_llama \
#     DOCS_DIR=docs/results/overopt_llama bash docs/results/overopt.sh   # the GRM arm (GRM needs a causal LM)
#   SKIP_TRAIN=1 bash docs/results/overopt.sh                  # best-of-n and the summary on finished sweeps
# Sweeps land in outputs/results/overopt/<loss>/, best-of-n in outputs/results/overopt/bon/<loss>/; the summary
# (bon_summary.md, bon_summary.png) and each loss's bon.png are copied to docs/results/overopt/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
LOSSES=${LOSSES:-bt margin}  # the arms; odin and grm need per-loss overrides (EXTRA_<loss>, above)
ENSEMBLE=${ENSEMBLE:-bt}     # the loss whose 3 seeds also form an ensemble (mean, min, uwo)
PROMPTS=${PROMPTS:-32}       # held-out prompts for best-of-n, 256 generator samples each
JOBS=${JOBS:-2}              # sweeps / best-of-n runs at a time, one thread each (2 cores)
root=${ROOT_DIR:-outputs/results/overopt}  # sweeps and best-of-n runs
docs=${DOCS_DIR:-docs/results/overopt}     # the summary and plots
mkdir -p "$root"

run_limited() {  # run "$@" in the background, at most JOBS at a time
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  "$@" &
}

if [ -z "${SKIP_TRAIN:-}" ]; then
  for loss in $LOSSES; do
    rm -rf "${root:?}/$loss"
    extra_var="EXTRA_$loss"
    run_limited bash -c "$PY train.py -m experiment=overopt loss=$loss ${!extra_var:-} threads=1 hydra.sweep.dir=$root/$loss > $root/$loss.log 2>&1"
  done
  wait
fi

# Best-of-n on each loss's exports (for $ENSEMBLE also their ensembles): bon_pass <out name> [bon options]
bon_pass() {
  local name=$1; shift
  for loss in $LOSSES; do
    args=()
    for e in "$root/$loss"/*/export; do args+=(--model "$e"); done
    combine=none
    [ "$loss" = "$ENSEMBLE" ] && combine=mean,min,uwo
    run_limited bash -c "$PY -m rmlab.bon ${args[*]} --combine $combine --label $loss --prompts $PROMPTS --threads 1 \
      $* --out $root/$name/$loss > $root/${name}_$loss.log 2>&1"
  done
  wait
}

bon_pass bon
# The same models under a policy that flatters rarely (5%): the full rise-and-fall (docs/results.md#overopt)
bon_pass bon_policy05 --hack-rate 0.05

mkdir -p "$docs"
$PY -m rmlab.bon --summarize $(for l in $LOSSES; do echo "$root/bon/$l"; done) --out "$docs"
for loss in $LOSSES; do cp "$root/bon/$loss/bon.png" "$docs/bon_$loss.png"; done
$PY -m rmlab.bon --summarize $(for l in $LOSSES; do echo "$root/bon_policy05/$l"; done) --out "$docs/policy05"
