"""The attention-memory formula of docs/scaling.md (scripts/bench_attention_memory.py) against a measurement
of the bytes ``attention.stack_meta`` allocates on CPU (a dispatch mode that follows every storage)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "bench_attention_memory", ROOT / "scripts" / "bench_attention_memory.py"
)
assert _spec is not None and _spec.loader is not None
bam = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bam)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend", ["sdpa", "flash", "flex"])
def test_formula_matches_measured_metadata_bytes(backend: str) -> None:
    B, T, doc_len = 2, 256, 16
    m = bam.measure(backend, B, T, doc_len)
    f = bam.formula(backend, B, T, n_docs=B * math.ceil(T / doc_len), itemsize=4)
    assert m["kept"] == f["kept"]
    if backend == "sdpa":  # B*T^2*(1 + s): the boolean mask and the float mask, plus a few scalars
        assert abs(m["build_peak"] - f["build_peak"]) <= 0.01 * f["build_peak"]
    elif backend == "flash":  # O(B*T): never a T x T tensor
        assert m["build_peak"] <= f["build_peak"] < T * T


def test_shared_dense_mask_is_the_dense_path_cost() -> None:
    """At B=8, 8192 bytes, bf16: 1 GiB kept per stack on the SDPA path, under 1 MiB on flash / flex."""
    f = {b: bam.formula(b, 8, 8192, n_docs=128, itemsize=2) for b in ("sdpa", "flash", "flex")}
    assert f["sdpa"]["kept"] == 2**30 and f["sdpa"]["build_peak"] == 1.5 * 2**30
    assert f["flash"]["kept"] < 2**20 and f["flex"]["kept"] < 2**20
