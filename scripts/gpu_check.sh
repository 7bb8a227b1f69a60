#!/usr/bin/env bash
# bytelm GPU check: run on a CUDA machine (`make gpu-check`). Installs the GPU extras, runs the gpu-marked
# tests (flash-attn vs SDPA agreement, ...), the distributed strategy tests on CUDA in bf16 (ddp, ZeRO-2/3,
# FSDP2; 2 GPUs when there are, else 1), and scripts/bench_models.py with MFU. Everything goes under $OUT
# (default ./out/gpu): logs, junit XML, env.json, bench JSON and summary.txt. It does not stop at the first
# failure; its exit status is non-zero if any step failed. docs/gpu.md says how to read the results.
#
#   bash scripts/gpu_check.sh                 # everything
#   SKIP_INSTALL=1 bash scripts/gpu_check.sh  # reuse an installed .venv
#   SKIP_FLASH=1 bash scripts/gpu_check.sh    # no flash-attn build (its tests then skip)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-./out/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
export DS_BUILD_OPS="${DS_BUILD_OPS:-0}" WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
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
  echo "gpu_check: no nvidia-smi; this script needs a CUDA machine" >&2
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
PY="${VENV}/bin/python"

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

step gpu_tests "${OUT}/pytest-gpu.log" "${PY}" -m pytest -m "gpu and not distributed" -v -rs \
  --junitxml="${OUT}/pytest-gpu.xml"
step distributed_cuda "${OUT}/pytest-distributed-cuda.log" "${PY}" -m pytest -m "gpu and distributed" -v -rs -s \
  tests/test_distributed.py --junitxml="${OUT}/pytest-distributed-cuda.xml"
step bench_models "${OUT}/bench_models.log" "${PY}" scripts/bench_models.py --device cuda \
  --out "${OUT}/bench_models.json"

{
  echo "bytelm gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  grep -m1 -E '"devices"' -A3 "${OUT}/env.json" || true
  failed=0
  for name in "${!STATUS[@]}"; do
    echo "${name}: exit ${STATUS[${name}]}"
    [[ "${STATUS[${name}]}" == 0 ]] || failed=1
  done
  grep -hE "^cuda .*max \|loss" "${OUT}/pytest-distributed-cuda.log" || true
  grep -hiE "mfu" "${OUT}/bench_models.log" | tail -n 5 || true
  echo "results: ${OUT}"
  exit "${failed}"
} | tee "${OUT}/summary.txt"
exit "${PIPESTATUS[0]}"
