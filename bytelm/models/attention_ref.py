"""A pure-torch stand-in for flash-attn's two functions, to run bytelm's flash path where flash-attn cannot be
installed (CPU). Tests and ``scripts/gpu_check.py --cpu-dry-run`` put it in place of the real kernels by
replacing ``bytelm.models.attention.load_flash``::

    monkeypatch.setattr(attention, "load_flash", lambda: REFERENCE)

Same signatures and semantics as flash-attn 2 (layout (B, T, H, hd) / (N, H, hd); ``causal`` aligned to the
bottom right, i.e. query i of Lq sees keys <= i + Lk - Lq; ``window_size=(left, right)``, -1 = unbounded;
fewer KV heads than query heads). It works one segment (document) at a time, so it never allocates a T x T
tensor for a row of T bytes split into shorter documents: a test that finds one has found it in the layer
code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bytelm.models.attention import FlashKernels


def _segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    window: tuple[int, int],
    scale: float | None,
) -> torch.Tensor:
    """One segment: q (Lq, H, hd), k/v (Lk, KV, hd) -> (Lq, H, hd)."""
    H, KV = q.shape[1], k.shape[1]
    qh, kh, vh = (t.transpose(0, 1) for t in (q, k, v))  # (H|KV, L, hd)
    if KV != H:
        kh, vh = kh.repeat_interleave(H // KV, 0), vh.repeat_interleave(H // KV, 0)
    lq, lk = qh.shape[1], kh.shape[1]
    left, right = window
    if left < 0 and right < 0 and (not causal or lq == lk):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    else:  # an explicit (Lq, Lk) mask of this segment only
        qpos = torch.arange(lq, device=q.device).unsqueeze(1) + (lk - lq)
        kpos = torch.arange(lk, device=q.device).unsqueeze(0)
        ok = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            ok &= kpos <= qpos
        if left >= 0:
            ok &= qpos - kpos <= left
        if right >= 0:
            ok &= kpos - qpos <= right
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=ok, scale=scale)
    return out.transpose(0, 1)


def ref_flash_attn_func(
    q,
    k,
    v,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    **_: object,
) -> torch.Tensor:
    """flash_attn_func: (B, Lq, H, hd), (B, Lk, KV, hd) -> (B, Lq, H, hd), row by row."""
    assert dropout_p == 0.0
    return torch.stack(
        [_segment(q[b], k[b], v[b], causal, window_size, softmax_scale) for b in range(q.shape[0])]
    )


def ref_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    **_: object,
) -> torch.Tensor:
    """flash_attn_varlen_func: (Nq, H, hd), (Nk, KV, hd) packed segments -> (Nq, H, hd), segment by
    segment."""
    assert dropout_p == 0.0
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max(b - a for a, b in zip(cq[:-1], cq[1:], strict=True)) <= max_seqlen_q
    outs = [
        _segment(q[a:b], k[c:d], v[c:d], causal, window_size, softmax_scale)
        for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True)
    ]
    return torch.cat(outs, 0)


REFERENCE = FlashKernels(
    ref_flash_attn_func,
    ref_flash_attn_varlen_func,
    devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
)
