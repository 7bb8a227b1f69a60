#!/usr/bin/env bash
# Train every model that docs/results.md compares, then write docs/results.md (+ docs/img/*.png and the README
# block) with scripts/report.py. On the 2-core CPU machine: about 20 minutes of training with two runs at a
# time, and 25 minutes of evaluation (most of it the SmolLM2 teacher row).
#
#   bash scripts/make_results.sh            # everything
#   SKIP_TRAIN=1 bash scripts/make_results.sh   # only re-evaluate the existing runs
#
# Validation every 50 steps gives the bpb-vs-FLOPs curves their points. hat_tiny / flat_tiny are the demo's
# pair (flat_tiny gets hat_tiny's training FLOPs); the distillation pair uses its experiments' own settings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/results}
export OMP_NUM_THREADS=1 WANDB_MODE=offline
COMMON=(logger=csv trainer.progress=false)
VAL=data.val_max_bytes=131072  # the demo's validation set; the distillation pair keeps its own (16,384 bytes)

train() {  # train NAME OVERRIDES...
  local name=$1
  shift
  echo "== training $name"
  "$PY" -m bytelm.train "$@" "${COMMON[@]}" "trainer.out_dir=$OUT/$name" >"$OUT/$name.log" 2>&1 \
    || { echo "training $name failed, see $OUT/$name.log" >&2; return 1; }
}

if [[ -z "${SKIP_TRAIN:-}" ]]; then
  mkdir -p "$OUT"
  # flat_tiny's budget = hat_tiny's training FLOPs at 400 steps (the demo's rule, bytelm.models.flops)
  BUDGET=$("$PY" - <<'EOF'
from bytelm.config import load_config
from bytelm.models.flops import flops_per_byte
c = load_config(["experiment=hat_tiny"])
print(flops_per_byte(c.model, c.data.seq_len) * 400 * c.data.batch_size * c.data.seq_len * c.trainer.accumulate)
EOF
)
  train hat_tiny experiment=hat_tiny trainer.max_steps=400 trainer.val_every=50 "$VAL" &
  train flat_tiny experiment=flat_tiny "trainer.flops_budget=$BUDGET" trainer.val_every=50 "$VAL" &
  wait
  train hat_tiny_gate experiment=hat_tiny_gate trainer.max_steps=400 trainer.val_every=50 "$VAL" &
  train mrt5_tiny experiment=mrt5_tiny trainer.val_every=50 "$VAL" &
  wait
  train mrt5_tiny_nogate experiment=mrt5_tiny_nogate trainer.val_every=50 "$VAL" &
  train distill_ce_baseline_tiny experiment=distill_ce_baseline_tiny &
  wait
  train distill_smollm2_tiny experiment=distill_smollm2_tiny
fi

runs=()
for name in flat_tiny hat_tiny hat_tiny_gate mrt5_tiny mrt5_tiny_nogate distill_smollm2_tiny distill_ce_baseline_tiny; do
  runs+=(--run "$name=$OUT/$name")
done
"$PY" scripts/report.py "${runs[@]}" --teacher --teacher-max-bytes 8192 --max-bytes 65536 --threads 2 \
  --out docs/results.md --readme README.md
