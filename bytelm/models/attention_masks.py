"""Attention masks and per-batch attention metadata, one function per backend (``attention.stack_meta`` calls
them once per stack and forward): SDPA's dense additive mask, flash-attn's ``cu_seqlens``, flex's
``BlockMask``. Memory of each: docs/scaling.md (checked by scripts/bench_attention_memory.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

NEG_INF = -1e9  # finite: a fully masked row (padding) gives a uniform softmax instead of NaN


def build_mask(
    tq: int,
    tk: int,
    *,
    device: torch.device,
    causal: bool,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor | None:
    """Boolean "may attend" mask, shape (B|1, 1, Tq|1, Tk), or None when everything is allowed.

    Query i sits at absolute position ``q_offset + i``; key j at position j (the cache holds keys 0..Tk-1).
    ``doc_ids`` (B, T) with Tq == Tk forbids attention across packed documents.
    """
    allowed: torch.Tensor | None = None
    if causal or window > 0:
        qpos = torch.arange(tq, device=device).unsqueeze(1) + q_offset  # (Tq, 1)
        kpos = torch.arange(tk, device=device).unsqueeze(0)  # (1, Tk)
        a = torch.ones(tq, tk, dtype=torch.bool, device=device)
        if causal:
            a = a & (kpos <= qpos)
        if window > 0:
            a = a & ((qpos - kpos) < window) & ((kpos - qpos) < window)
        allowed = a.view(1, 1, tq, tk)
    if doc_ids is not None:
        if doc_ids.shape[1] != tk or tq != tk:
            raise ValueError("doc_ids needs equal query and key lengths (no packing with a KV cache)")
        same = (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)).unsqueeze(1)  # (B, 1, T, T)
        allowed = same if allowed is None else allowed & same
    if key_mask is not None:
        km = key_mask.bool().view(key_mask.shape[0], 1, 1, tk)
        allowed = km if allowed is None else allowed & km
    return allowed


@torch.compiler.disable
def varlen_info(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash varlen metadata of packed rows: ``cu_seqlens`` (n_segments + 1,) int32 and ``max_seqlen``. A
    segment starts at each row start and where the document id changes. One host sync (the boundaries go to
    the host once; the offsets come back without a device sync); under torch.compile a graph break."""
    B, T = doc_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = np.flatnonzero(starts.flatten().cpu().numpy())  # the one sync
    cu = np.append(idx, B * T).astype(np.int32)
    max_seqlen = int(np.diff(cu).max())
    return torch.from_numpy(cu).to(doc_ids.device, non_blocking=True), max_seqlen


_block_mask_fns: dict[str, Callable[..., Any]] = {}


def make_block_mask(mask_mod: Callable[..., Any], B: int, tq: int, tk: int, device: torch.device) -> Any:
    """flex ``BlockMask`` for ``mask_mod``; compiled on CUDA, so no Tq x Tk tensor is built there."""
    from torch.nn.attention.flex_attention import create_block_mask

    fn = create_block_mask
    if device.type == "cuda":
        if "cuda" not in _block_mask_fns:
            _block_mask_fns["cuda"] = torch.compile(create_block_mask)
        fn = _block_mask_fns["cuda"]
    return fn(mask_mod, B, None, tq, tk, device=device)


def flex_mask_mod(
    *,
    causal: bool,
    q_offset: int = 0,
    window: int = 0,
    doc_ids: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> Callable[..., Any]:
    """flex ``mask_mod``: query i at position ``q_offset + i`` may see key j (causal, window, same document,
    not padding)."""
    km = key_mask.bool() if key_mask is not None else None

    def mask_mod(b, h, qi, kj):
        qpos = qi + q_offset
        ok = kj >= 0
        if causal:
            ok = ok & (kj <= qpos)
        if window > 0:
            ok = ok & ((qpos - kj) < window) & ((kj - qpos) < window)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, qi] == doc_ids[b, kj])
        if km is not None:
            ok = ok & km[b, kj]
        return ok

    return mask_mod


def sdpa_mask(
    B: int,
    tq: int,
    tk: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    causal: bool,
    q_offset: int = 0,
    window: int = 0,
    doc_ids: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    null_key: bool = False,
) -> torch.Tensor | None:
    """SDPA's additive float mask, (B|1, 1, Tq|1, Tk[+1]) (0 = may attend, NEG_INF = may not, plus the per-key
    bias; +1 column: the null key, score 0 for every query), or None."""
    allowed = build_mask(
        tq,
        tk,
        device=device,
        causal=causal,
        q_offset=q_offset,
        doc_ids=doc_ids,
        key_mask=key_mask,
        window=window,
    )
    bias = key_bias.to(dtype).view(B, 1, 1, tk) if key_bias is not None else None  # (B, 1, 1, Tk)
    if allowed is not None:
        base = bias if bias is not None else torch.zeros((), dtype=dtype, device=device)
        bias = torch.where(allowed, base, torch.tensor(NEG_INF, dtype=dtype, device=device))
    if null_key:  # the null key: score 0 for every query, never masked
        bias = bias if bias is not None else torch.zeros(1, 1, 1, tk, dtype=dtype, device=device)
        bias = F.pad(bias, (0, 1), value=0.0)
    return bias
