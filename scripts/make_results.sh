#!/usr/bin/env bash
# Train every model that docs/results.md compares, then write docs/results.md (+ docs/img/*.png and the README
# block) with scripts/report.py. Two lanes of training at a time. Measured on the 2-core CPU machine while other
# jobs shared it: 80 minutes of training, 35 minutes of evaluation (24 of them the SmolLM2 teacher row).
#
#   bash scripts/make_results.sh                 # everything
#   SKIP_TRAIN=1 bash scripts/make_results.sh    # only (re-)evaluate the existing runs
#
# Each experiment is trained twice:
# - as configured (Shakespeare): every column of the main table except the multilingual one. The experiments
#   carry the settings of their rows (bytelm/conf/experiment/*.yaml: steps, validation every 50 steps over
#   131,072 bytes for the bpb-vs-FLOPs curves); hat_tiny / flat_tiny are the demo's pair (scripts/demo.py:
#   flat_tiny's trainer.flops_budget = hat_tiny's training FLOPs, bytelm.eval.curves.run_training_flops);
# - with data=mixture (90% Shakespeare, 10% chatterbot dialogs), under $OUT/mixture: the multilingual numbers,
#   so that they come from models that trained on the languages (scored on the held-out dialogs).
# Evaluations are cached in $OUT/eval_cache (report.py --cache): a rerun re-evaluates only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/results}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=1 WANDB_MODE=offline
COMMON=(logger=csv trainer.progress=false)
# the mixture runs are only scored by report.py: validate rarely, on a small set (bytes per group)
MIX=(data=mixture trainer.val_every=200 data.val_max_bytes=16384)
EXPERIMENTS=(flat_tiny hat_tiny hat_tiny_gate mrt5_tiny mrt5_tiny_nogate distill_smollm2_tiny distill_ce_baseline_tiny)

train() {  # train OUT_DIR EXPERIMENT OVERRIDES...
  local dir=$1 name=$2
  shift 2
  echo "== training $dir/$name"
  mkdir -p "$dir"
  "$PY" -m bytelm.train "experiment=$name" "$@" "${COMMON[@]}" "trainer.out_dir=$dir/$name" >"$dir/$name.log" 2>&1 \
    || { echo "training $dir/$name failed, see $dir/$name.log" >&2; return 1; }
}

pair() {  # pair OUT_DIR OVERRIDES...: hat_tiny, then flat_tiny at its training FLOPs (the demo, no export)
  local dir=$1
  shift
  echo "== training $dir/hat_tiny and $dir/flat_tiny (scripts/demo.py)"
  mkdir -p "$dir"
  "$PY" scripts/demo.py --out "$dir" --skip-export "$@" >"$dir/demo.log" 2>&1 \
    || { echo "scripts/demo.py --out $dir failed, see $dir/demo.log" >&2; return 1; }
}

lane1() {
  pair "$OUT"
  train "$OUT" distill_ce_baseline_tiny
  train "$OUT" distill_smollm2_tiny
  pair "$OUT/mixture" "${MIX[@]}"
  train "$OUT/mixture" distill_ce_baseline_tiny "${MIX[@]}"
  train "$OUT/mixture" distill_smollm2_tiny "${MIX[@]}"
}

lane2() {
  local name
  for name in hat_tiny_gate mrt5_tiny mrt5_tiny_nogate; do train "$OUT" "$name"; done
  for name in hat_tiny_gate mrt5_tiny mrt5_tiny_nogate; do train "$OUT/mixture" "$name" "${MIX[@]}"; done
}

if [[ -z "${SKIP_TRAIN:-}" ]]; then
  lane1 &
  p1=$!
  lane2 &
  p2=$!
  status=0
  wait "$p1" || status=1
  wait "$p2" || status=1
  ((status == 0)) || exit 1
fi

runs=()
for name in "${EXPERIMENTS[@]}"; do
  runs+=(--run "$name=$OUT/$name" --multilingual-run "$name=$OUT/mixture/$name")
done
# TIMINGS=0: leave out absolute timings (the runs shared the machine with other jobs: times measure its load)
[[ "${TIMINGS:-1}" == 0 ]] && runs+=(--no-timings)
"$PY" scripts/report.py "${runs[@]}" --teacher --teacher-max-bytes 8192 --max-bytes 65536 --threads "$THREADS" \
  --cache "$OUT/eval_cache" --out docs/results.md --readme README.md
