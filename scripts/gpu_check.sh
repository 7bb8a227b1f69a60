#!/usr/bin/env bash
# bytelm GPU check: run on a CUDA machine (`make gpu-check`); docs/gpu.md says how to read the results.
# Installs the GPU extras, then scripts/gpu_check.py (budgeted to ~6 minutes on one H100/H200): which backend
# `auto` picks, flash / flex / SDPA agreement on packed documents in bf16, hat_small eager vs compiled bytes/s and
# MFU, flat vs hierarchical at equal backbone, single / ZeRO-2 / ZeRO-3 / FSDP2 on one GPU with peak memory ->
# $OUT/gpu_check.json and $OUT/gpu_check.md (a table for docs/gpu.md); then the gpu-marked tests. Everything goes
# under $OUT (default ./out/gpu): logs, junit XML, env.json, summary.txt. It does not stop at the first failure;
# its exit status is non-zero if any step failed. Without the install step it finishes within 8 minutes.
#
#   bash scripts/gpu_check.sh                 # everything
#   bash scripts/gpu_check.sh --cpu-dry-run   # the same gpu_check.py logic on CPU, tiny sizes (no GPU, no install)
#   SKIP_INSTALL=1 bash scripts/gpu_check.sh  # reuse an installed .venv
#   SKIP_FLASH=1 bash scripts/gpu_check.sh    # no flash-attn build (auto then picks flex; flash checks skip)
#   FULL=1 bash scripts/gpu_check.sh          # also the 2-GPU strategy tests and scripts/bench_models.py (longer)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
export DS_BUILD_OPS="${DS_BUILD_OPS:-0}" WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true

if [[ "${1:-}" == "--cpu-dry-run" ]]; then
  OUT="${OUT:-./out/gpu-dry-run}"
  mkdir -p "$OUT"
  if [[ -z "${PY:-}" ]]; then
    if [[ -x "${VENV}/bin/python" ]]; then PY="${VENV}/bin/python"; else PY="${PYTHON}"; fi
  fi
  exec "${PY}" scripts/gpu_check.py --cpu-dry-run --out "${OUT}"
fi

OUT="${OUT:-./out/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
declare -A STATUS=()

step() {  # step NAME LOGFILE CMD...: run, tee the log, remember the exit status
  local name="$1" log="$2"
  shift 2
  echo "=== ${name}: $*" | tee "${log}"
  "$@" 2>&1 | tee -a "${log}"
  STATUS["${name}"]=${PIPESTATUS[0]}
  echo "=== ${name}: exit ${STATUS[${name}]}" | tee -a "${log}"
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no nvidia-smi; this script needs a CUDA machine (or: --cpu-dry-run)" >&2
  exit 2
fi
nvidia-smi >"${OUT}/nvidia-smi.txt" 2>&1

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  [[ -x "${VENV}/bin/python" ]] || "${PYTHON}" -m venv "${VENV}"
  step install "${OUT}/install.log" "${VENV}/bin/python" -m pip install --upgrade pip wheel setuptools ninja packaging
  step install_bytelm "${OUT}/install.log.bytelm" "${VENV}/bin/python" -m pip install -e ".[dev,distill,deepspeed,slurm]"
  if [[ "${SKIP_FLASH:-0}" != 1 ]]; then
    # flash-attn ships source only on PyPI: built against the installed torch (nvcc needed; MAX_JOBS bounds RAM)
    step install_flash "${OUT}/install.log.flash" env MAX_JOBS="${MAX_JOBS:-8}" \
      "${VENV}/bin/python" -m pip install --no-build-isolation "flash-attn>=2.6"
  fi
fi
PY="${PY:-${VENV}/bin/python}"

"${PY}" - >"${OUT}/env.json" 2>"${OUT}/env.err" <<'PYEOF'
import json, platform
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
for mod in ("flash_attn", "deepspeed", "lightning"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001
        info[mod] = f"missing ({type(e).__name__})"
print(json.dumps(info, indent=2))
PYEOF
cat "${OUT}/env.json"

step gpu_check "${OUT}/gpu_check.log" "${PY}" scripts/gpu_check.py --out "${OUT}" --budget-s "${BUDGET_S:-330}"
step gpu_tests "${OUT}/pytest-gpu.log" "${PY}" -m pytest -m "gpu and not distributed" -v -rs \
  --junitxml="${OUT}/pytest-gpu.xml"
if [[ "${FULL:-0}" == 1 ]]; then
  step distributed_cuda "${OUT}/pytest-distributed-cuda.log" "${PY}" -m pytest -m "gpu and distributed" -v -rs -s \
    tests/train/test_distributed.py --junitxml="${OUT}/pytest-distributed-cuda.xml"
  step bench_models "${OUT}/bench_models.log" "${PY}" scripts/bench_models.py --device cuda \
    --out "${OUT}/bench_models.json"
fi

{
  echo "bytelm gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  grep -m1 -E '"devices"' -A3 "${OUT}/env.json" || true
  failed=0
  for name in "${!STATUS[@]}"; do
    echo "${name}: exit ${STATUS[${name}]}"
    [[ "${STATUS[${name}]}" == 0 ]] || failed=1
  done
  cat "${OUT}/gpu_check.md" 2>/dev/null || true
  grep -hE "^cuda .*max \|loss" "${OUT}/pytest-distributed-cuda.log" 2>/dev/null || true
  echo "results: ${OUT}"
  exit "${failed}"
} | tee "${OUT}/summary.txt"
exit "${PIPESTATUS[0]}"
