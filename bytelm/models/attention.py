"""One attention entry point for every bytelm model, with a backend chosen by config.

Backends:
- ``sdpa``  (default): ``torch.nn.functional.scaled_dot_product_attention``; CPU and GPU; supports every
  feature below (causal with a cache offset, packed documents, sliding window, per-key bias, padding).
- ``flash``: flash-attn 2 (``flash_attn_func`` / ``flash_attn_varlen_func`` for packed documents); CUDA and
  fp16/bf16 only; no per-key bias.
- ``flex``:  ``torch.nn.attention.flex_attention`` with a block mask; CUDA only (no backward on CPU).

When the requested backend cannot serve a call (not installed, no CUDA, unsupported feature), the call falls
back to SDPA and one log line per (backend, reason) says so. Results agree across backends (tested).

``null_key=True`` turns the softmax into softmax1 (``exp(s_j) / (1 + sum_k exp(s_k))``, "attention off by
one"): an extra key with score 0 and value 0 that every query sees and no mask removes. MrT5 needs it where
the delete gate's bias ``G`` enters the scores: a plain softmax is invariant to a uniform shift of ``G``, so
the loss could not tell "delete everything a bit more"; with the null key a lower ``G`` moves attention mass
onto the null key (the output shrinks), so the task loss pushes back. Served by SDPA (the other backends fall
back).
"""

from __future__ import annotations

import logging
from enum import Enum

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NEG_INF = -1e9  # finite: a fully masked row (padding) gives a uniform softmax instead of NaN


class Backend(str, Enum):
    SDPA = "sdpa"
    FLASH = "flash"
    FLEX = "flex"


_warned: set[tuple[str, str]] = set()


def _fallback(backend: str, reason: str) -> None:
    if (backend, reason) not in _warned:
        _warned.add((backend, reason))
        log.warning("attention backend %r unavailable (%s); falling back to sdpa", backend, reason)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def parse_backend(name: str) -> Backend:
    try:
        return Backend(name)
    except ValueError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {[b.value for b in Backend]}") from None


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
    """Boolean "may attend" mask, shape (B|1, 1, Tq, Tk), or None when everything is allowed.

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


def _sdpa(q, k, v, *, causal, q_offset, doc_ids, key_bias, key_mask, window, null_key=False):
    tq, tk = q.shape[2], k.shape[2]
    if null_key:
        return _sdpa_null_key(q, k, v, causal=causal, q_offset=q_offset, doc_ids=doc_ids, key_bias=key_bias,
                              key_mask=key_mask, window=window)
    simple = doc_ids is None and key_bias is None and key_mask is None and window == 0
    if simple and (not causal or (q_offset == 0 and tq == tk)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if simple and tq == 1 and q_offset == tk - 1:  # one cached decoding step: every key is in the past
        return F.scaled_dot_product_attention(q, k, v)
    allowed = build_mask(
        tq, tk, device=q.device, causal=causal, q_offset=q_offset, doc_ids=doc_ids, key_mask=key_mask,
        window=window,
    )
    bias: torch.Tensor | None = None
    if key_bias is not None:
        bias = key_bias.to(q.dtype).view(key_bias.shape[0], 1, 1, tk)  # (B, 1, 1, Tk)
    if allowed is not None:
        base = bias if bias is not None else torch.zeros((), dtype=q.dtype, device=q.device)
        bias = torch.where(allowed, base, torch.tensor(NEG_INF, dtype=q.dtype, device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _sdpa_null_key(q, k, v, *, causal, q_offset, doc_ids, key_bias, key_mask, window):
    """softmax1 through SDPA: append one all-zero key and value (score ``q . 0 = 0``, bias 0, never masked,
    no position: zero stays zero under RoPE) after the ``Tk`` real keys."""
    B, H, tq, hd = q.shape
    tk = k.shape[2]
    zero = q.new_zeros(B, H, 1, hd)
    k1 = torch.cat([k, zero.to(k.dtype)], dim=2)
    v1 = torch.cat([v, zero.to(v.dtype)], dim=2)
    allowed = build_mask(
        tq, tk, device=q.device, causal=causal, q_offset=q_offset, doc_ids=doc_ids, key_mask=key_mask,
        window=window,
    )  # (B|1, 1, Tq, Tk) or None
    bias = key_bias.to(q.dtype).view(-1, 1, 1, tk) if key_bias is not None else q.new_zeros(1, 1, 1, tk)
    if allowed is not None:
        bias = torch.where(allowed, bias, torch.tensor(NEG_INF, dtype=q.dtype, device=q.device))
    bias = F.pad(bias, (0, 1), value=0.0)  # the null key: score 0 for every query
    return F.scaled_dot_product_attention(q, k1, v1, attn_mask=bias)


def _flash(q, k, v, *, causal, doc_ids, window):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    ws = (window - 1, window - 1 if not causal else 0) if window > 0 else (-1, -1)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, T, H, hd)
    if doc_ids is None:
        return flash_attn_func(qt, kt, vt, causal=causal, window_size=ws).transpose(1, 2)
    B, T, H, hd = qt.shape
    # a new segment starts where the document id changes or a new row begins
    starts = torch.ones(B, T, dtype=torch.bool, device=q.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.flatten()).flatten().to(torch.int32)
    cu = torch.cat([idx, torch.tensor([B * T], dtype=torch.int32, device=q.device)])
    maxlen = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(
        qt.view(B * T, H, hd), kt.view(B * T, H, hd), vt.view(B * T, H, hd), cu, cu, maxlen, maxlen,
        causal=causal, window_size=ws,
    )
    return out.view(B, T, H, hd).transpose(1, 2)


def _flex(q, k, v, *, causal, q_offset, doc_ids, key_mask, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, _, tq, _ = q.shape
    tk = k.shape[2]

    def mask_mod(b, h, qi, kj):
        ok = kj >= 0
        if causal:
            ok = ok & (kj <= qi + q_offset)
        if window > 0:
            ok = ok & ((qi + q_offset - kj) < window)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, qi] == doc_ids[b, kj])
        if key_mask is not None:
            ok = ok & key_mask[b, kj]
        return ok

    bm = create_block_mask(mask_mod, B, None, tq, tk, device=q.device)
    return flex_attention(q, k, v, block_mask=bm)


def attend(
    q: torch.Tensor,  # (B, H, Tq, hd)
    k: torch.Tensor,  # (B, H, Tk, hd)
    v: torch.Tensor,  # (B, H, Tk, hd)
    *,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,  # (B, T)
    key_bias: torch.Tensor | None = None,  # (B, Tk) additive, e.g. MrT5 gate values
    key_mask: torch.Tensor | None = None,  # (B, Tk) bool, False = padding
    window: int = 0,
    backend: str | Backend = Backend.SDPA,
    null_key: bool = False,  # softmax1: an extra key with score 0 and value 0 (MrT5)
) -> torch.Tensor:  # (B, H, Tq, hd)
    """Scaled dot-product attention with the features bytelm's models need, on the chosen backend."""
    b = parse_backend(backend) if isinstance(backend, str) else backend
    if null_key and b is not Backend.SDPA:
        _fallback(b.value, "null key (softmax1)")
    elif b is Backend.FLASH:
        if not flash_available():
            _fallback("flash", "flash-attn not installed or no CUDA")
        elif q.dtype not in (torch.float16, torch.bfloat16):
            _fallback("flash", f"dtype {q.dtype} (flash-attn needs fp16/bf16)")
        elif key_bias is not None or key_mask is not None:
            _fallback("flash", "per-key bias / padding mask")
        elif doc_ids is not None and q.shape[2] != k.shape[2]:
            _fallback("flash", "packed documents with a KV cache")
        elif q_offset != 0 and q.shape[2] + q_offset != k.shape[2]:
            _fallback("flash", "query offset not aligned to the cache end")
        else:
            return _flash(q, k, v, causal=causal, doc_ids=doc_ids, window=window)
    elif b is Backend.FLEX:
        if not q.is_cuda:
            _fallback("flex", "flex_attention has no CPU backward")
        elif key_bias is not None:
            _fallback("flex", "per-key bias")
        else:
            return _flex(q, k, v, causal=causal, q_offset=q_offset, doc_ids=doc_ids, key_mask=key_mask,
                         window=window)
    return _sdpa(q, k, v, causal=causal, q_offset=q_offset, doc_ids=doc_ids, key_bias=key_bias,
                 key_mask=key_mask, window=window, null_key=null_key)
