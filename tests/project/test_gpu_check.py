"""``scripts/gpu_check.sh --cpu-dry-run``: the GPU check's logic (auto choice, backend agreement through the
flash reference kernel and flex, eager vs compiled throughput, a strategy run through bytelm.train, the JSON
and the markdown table) runs on CPU with tiny sizes; GPU-only parts are skipped with the reason printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_dry_run(tmp_path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "OMP_NUM_THREADS": "2"}
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["cpu_dry_run"]
    for section in ("auto", "agreement", "throughput", "strategies"):
        assert "error" not in rep[section], rep[section]
    assert rep["auto"]["byte stacks (packed documents)"]["backend"] == "sdpa"  # CPU
    for check in ("attention_flash", "attention_flex", "model_flash", "model_flex"):
        assert rep["agreement"][check]["ok"], rep["agreement"][check]
    assert rep["throughput"]["hat_small compiled"]["bytes_per_s"] > 0
    assert rep["throughput"]["hat_small compiled/eager"] > 0
    assert rep["strategies"]["single"]["steps"] == 2
    assert "need CUDA" in rep["strategies"]["fsdp2"]["skipped"]
    assert "skipped fsdp2: ZeRO / FSDP2 on one GPU need CUDA" in p.stdout  # the reason is printed
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| hat_small eager |" in md and "| model_flash |" in md
