"""Attention memory of one stack per backend: the formula docs/scaling.md states, and a measurement on CPU.

Per stack and forward (B rows of T bytes, packed documents, compute dtype of ``s`` bytes, ``n`` documents),
the metadata ``attention.stack_meta`` builds and every layer of the stack shares:

- sdpa: the dense additive mask, ``B*T^2*s`` bytes kept through the forward (and by autograd until backward);
  building it peaks at about ``B*T^2*(1 + s)`` (the boolean "may attend" mask and the float mask it becomes).
  Before metadata was shared, every layer built its own and kept it for backward: ``L*B*T^2*s``.
- flash: ``cu_seqlens``, ``4*(n + 1)`` bytes (building it: two (B, T) booleans, the document starts).
- flex: the ``BlockMask``, 4 index tensors of ``B*(T/128)^2`` int32 and 4 count tensors of ``B*T/128`` int32
  (``16*B*(T/128)^2 + 16*B*T/128`` bytes), built block by block by the compiled ``create_block_mask`` on CUDA
  (the eager build on CPU evaluates the mask at every (query, key) pair: B*T^2 temporaries, CPU only).
Kernels add their own: flash and flex keep the log-sum-exp, ``4*B*H*T`` bytes; SDPA's fused CUDA kernels take
the mask as it is (no T x T scores).

Measured on CPU with a dispatch mode that follows every storage the metadata code allocates (live bytes and
their peak), at sizes small enough for the dense mask; the test (tests/models/test_attention_memory.py) holds
the formula to the measurement.

    python scripts/bench_attention_memory.py            # measured vs formula at small sizes
                                                        # + the table at B=8
"""

from __future__ import annotations

import argparse
import json
import math
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bytelm.models import attention

FLEX_BLOCK = 128


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while the mode is on, alive now (``current``) and at most
    (``peak``). A storage counts until its last tensor dies (a weakref finalizer on the storage)."""

    def __init__(self, existing: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.existing = {t.untyped_storage().data_ptr() for t in existing}  # views of these are not new bytes
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.live and key not in self.existing:
                    self.live[key] = st.nbytes()
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key)
        return out


def formula(backend: str, B: int, T: int, n_docs: int, itemsize: int = 2) -> dict[str, float]:
    """Bytes of one stack's attention metadata: ``kept`` (through the forward) and ``build_peak``."""
    if backend == "sdpa":
        return {"kept": B * T * T * itemsize, "build_peak": B * T * T * (1 + itemsize)}
    if backend == "flash":
        return {"kept": 4 * (n_docs + 1), "build_peak": 2 * B * T + 4 * (n_docs + 1)}
    nb = math.ceil(T / FLEX_BLOCK)
    kept = 16 * B * nb * nb + 16 * B * nb
    return {"kept": kept, "build_peak": kept}


def _docs(B: int, T: int, doc_len: int) -> torch.Tensor:
    return (torch.arange(T) // doc_len).expand(B, T).contiguous()


def measure(
    backend: str, B: int, T: int, doc_len: int = 16, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """Kept and peak bytes of ``stack_meta`` for a causal stack of packed rows, on CPU (flash through the
    reference kernel's capabilities; flex without autograd, as on CPU)."""
    from bytelm.models.attention_ref import REFERENCE

    x = torch.zeros(B, T, 8, dtype=dtype)
    docs = _docs(B, T, doc_len)
    old = attention.load_flash
    attention.load_flash = lambda: REFERENCE  # type: ignore[assignment]
    try:
        with torch.no_grad(), LiveBytes(existing=(x, docs)) as mem:
            meta = attention.stack_meta(x, backend, doc_ids=docs)
    finally:
        attention.load_flash = old  # type: ignore[assignment]
    if backend == "sdpa":
        kept = meta.mask.numel() * meta.mask.element_size() if meta.mask is not None else 0
    elif backend == "flash":
        kept = meta.cu_seqlens.numel() * 4 if meta.cu_seqlens is not None else 0
    else:
        bm = meta.block_mask
        kept = sum(
            t.numel() * t.element_size()
            for t in (
                bm.kv_num_blocks,
                bm.kv_indices,
                bm.full_kv_num_blocks,
                bm.full_kv_indices,
                bm.q_num_blocks,
                bm.q_indices,
                bm.full_q_num_blocks,
                bm.full_q_indices,
            )
            if t is not None
        )
    return {"kept": float(kept), "build_peak": float(mem.peak)}


def _gib(x: float) -> str:
    return (
        f"{x / 2**30:.3g} GiB"
        if x >= 2**30
        else (f"{x / 2**20:.3g} MiB" if x >= 2**20 else f"{x / 2**10:.3g} KiB")
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", default="out/bench_attention_memory.json")
    a = p.parse_args(argv)
    rows = []
    print("measured on CPU (fp32, documents of 16 bytes) vs formula, bytes:")
    print(
        f"{'backend':8s} {'B':>3s} {'T':>5s} {'kept':>12s} {'formula':>12s} {'build peak':>12s} "
        f"{'formula':>12s}"
    )
    for backend in ("sdpa", "flash", "flex"):
        for B, T in ((2, 128), (2, 256), (4, 256)):
            m = measure(backend, B, T)
            f = formula(backend, B, T, n_docs=B * math.ceil(T / 16), itemsize=4)
            rows.append({"backend": backend, "B": B, "T": T, "measured": m, "formula": f})
            print(
                f"{backend:8s} {B:3d} {T:5d} {m['kept']:12,.0f} {f['kept']:12,.0f} {m['build_peak']:12,.0f} "
                f"{f['build_peak']:12,.0f}"
            )
    table = []
    print("\none stack at B=8 in bf16 (documents of 512 bytes): kept / build peak")
    for T in (2048, 8192, 32768):
        line = {"T": T}
        for backend in ("sdpa", "flash", "flex"):
            f = formula(backend, 8, T, n_docs=8 * T // 512, itemsize=2)
            line[backend] = f
        table.append(line)
        print(
            f"T={T:6d}: "
            + "; ".join(
                f"{b} {_gib(line[b]['kept'])} / {_gib(line[b]['build_peak'])}"
                for b in ("sdpa", "flash", "flex")
            )
        )
    rep = {"measured_vs_formula": rows, "b8_bf16": table}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    main()
