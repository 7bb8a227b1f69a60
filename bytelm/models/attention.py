"""One attention entry point for every bytelm model: a backend chosen per stack, metadata built once per
forward.

Backends (``model.attn_backend``; the names are ``ATTN_BACKENDS``):
- ``auto`` (default): flash-attn varlen on CUDA when it is installed and the compute dtype is fp16/bf16; on
  CUDA otherwise SDPA where its mask has no query dimension (plain causal, per-key bias/padding only), else
  flex (and SDPA with a dense mask when flex cannot run either); SDPA off CUDA. Chosen per stack (a stack that
  needs MrT5's per-key bias cannot use flash) and logged once.
- ``sdpa``: ``F.scaled_dot_product_attention``; runs everything, everywhere. Packed documents, sliding windows
  and causal masks with a bias need a dense (B, 1, Tq, Tk) additive mask: built once per stack.
- ``flash``: flash-attn 2 (``flash_attn_varlen_func`` with ``cu_seqlens`` for packed documents); CUDA,
  fp16/bf16, no additive bias, no padding mask, no null key. Never allocates a Tq x Tk tensor.
- ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` (mask_mod: causal, window, documents,
  padding) and a ``score_mod`` for the per-key bias; softmax1 from its log-sum-exp. Compiled on CUDA (a fused
  kernel, no Tq x Tk tensor); on CPU it runs forward only (no backward there) and unfused.

An explicitly requested backend that cannot run a stack is an error that names the reason (OLMo-core's
``assert_supported`` style), unless ``model.attn_fallback=true``: then that stack takes ``auto``'s choice and
one log line says so.

Per-batch metadata (torchtitan's "build the masks once, pass them to every layer"): a model calls
:func:`stack_meta` once per stack and forward, and every layer of the stack runs :func:`attend` with the
returned :class:`AttnMeta`: ``cu_seqlens``/``max_seqlen`` for flash (one host sync), a ``BlockMask`` for flex,
the dense mask only on the SDPA path.

``null_key=True`` turns the softmax into softmax1 (``exp(s_j) / (1 + sum_k exp(s_k))``, "attention off by
one"): an extra key with score 0 and value 0 that every query sees and no mask removes. MrT5 needs it where
the delete gate's bias ``G`` enters the scores: a plain softmax is invariant to a uniform shift of ``G``, so
the loss could not tell "delete everything a bit more"; with the null key a lower ``G`` moves attention mass
onto the null key (the output shrinks), so the task loss pushes back. SDPA appends a zero key; flex scales its
output by ``sigmoid(lse)`` (= S / (S + 1) with S the sum of the exponentiated scores).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bytelm.models.attention_masks import (  # noqa: F401 - NEG_INF, build_mask: part of this module's interface
    NEG_INF,
    build_mask,
    flex_mask_mod,
    make_block_mask,
    sdpa_mask,
    varlen_info,
)
from bytelm.models.config import ATTN_BACKENDS, Backend  # noqa: F401 - ATTN_BACKENDS: part of this module's interface

log = logging.getLogger(__name__)


class AttentionBackendError(RuntimeError):
    """An explicitly requested attention backend cannot run a stack (the message says why)."""


def parse_backend(name: str | Backend) -> Backend:
    if isinstance(name, Backend):
        return name
    try:
        return Backend(name)
    except ValueError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(ATTN_BACKENDS)}") from None


# -------------------------------------------------------------------------------------------- flash-attn hook


@dataclass(frozen=True)
class FlashKernels:
    """The two flash-attn functions bytelm calls and where they run. ``func`` takes (B, T, H, hd) tensors,
    ``varlen_func`` (N, H, hd) tensors with ``cu_seqlens``; both with flash-attn's keyword arguments."""

    func: Callable[..., torch.Tensor]
    varlen_func: Callable[..., torch.Tensor]
    devices: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


_flash_cache: list[FlashKernels | None] = []


def load_flash() -> FlashKernels | None:
    """flash-attn's kernels, or None when it is not installed. The one place bytelm imports flash-attn: tests
    replace this hook with a pure-torch reference (``bytelm.models.attention_ref``) to run the flash path on
    CPU."""
    if not _flash_cache:
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func
        except ImportError:
            _flash_cache.append(None)
        else:
            _flash_cache.append(FlashKernels(flash_attn_func, flash_attn_varlen_func))
    return _flash_cache[0]


def flash_available() -> bool:
    k = load_flash()
    return k is not None and ("cuda" not in k.devices or torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class Needs:
    """What one stack's attention needs, as far as choosing a backend goes."""

    device: str
    dtype: torch.dtype
    grad: bool  # a backward pass will run through it
    causal: bool
    tq: int
    tk: int
    q_offset: int = 0
    window: int = 0
    docs: bool = False
    key_bias: bool = False
    key_mask: bool = False
    null_key: bool = False


def why_not(backend: Backend, n: Needs) -> str | None:
    """Why ``backend`` cannot run ``n`` (None: it can)."""
    if backend is Backend.FLASH:
        k = load_flash()
        if k is None:
            return "flash-attn is not installed (pip install flash-attn: CUDA builds only)"
        if n.device not in k.devices:
            return f"flash-attn needs CUDA tensors, these are on {n.device}"
        if n.dtype not in k.dtypes:
            return (
                f"flash-attn needs fp16/bf16, the compute dtype is {n.dtype} (train with bf16-mixed "
                "precision)"
            )
        if n.key_bias:
            return "flash-attn cannot add a per-key bias (MrT5's delete gate)"
        if n.null_key:
            return "flash-attn has no null key (softmax1)"
        if n.key_mask:
            return "flash-attn takes no padding mask"
        if n.docs and (n.tq != n.tk or n.q_offset):
            return "packed documents with a KV cache"
        if (n.causal or n.window) and n.q_offset != n.tk - n.tq:
            return "queries not aligned to the end of the keys"
    elif backend is Backend.FLEX:
        if n.device == "cpu" and n.grad:
            return "flex_attention has no backward on CPU"
        if n.device not in ("cpu", "cuda"):
            return f"flex_attention does not run on {n.device}"
    return None


def _sdpa_plan(n: Needs) -> str:
    """How SDPA serves ``n``: 'causal' (is_causal, no mask), 'none' (no mask) or 'mask' (additive mask)."""
    if n.docs or n.window or n.key_bias or n.key_mask or n.null_key:
        return "mask"
    if not n.causal or (n.tq == 1 and n.q_offset >= n.tk - 1):  # a cached decoding step sees every key
        return "none"
    return "causal" if n.q_offset == 0 and n.tq == n.tk else "mask"


def sdpa_dense(n: Needs) -> bool:
    """Whether SDPA needs a mask with a query dimension, (B|1, 1, Tq, Tk): Tq x Tk memory per stack (a per-key
    bias or padding mask alone is (B, 1, 1, Tk))."""
    return _sdpa_plan(n) == "mask" and n.tq > 1 and (n.causal or n.window > 0 or n.docs)


def auto_backend(n: Needs) -> tuple[Backend, str]:
    """``auto``'s choice for ``n`` and why (module docstring)."""
    if n.device != "cuda":
        return Backend.SDPA, f"{n.device} tensors: sdpa"
    flash = why_not(Backend.FLASH, n)
    if flash is None:
        return Backend.FLASH, f"CUDA, {n.dtype}, flash-attn installed: flash varlen"
    if not sdpa_dense(n):
        return Backend.SDPA, f"no flash ({flash}); sdpa needs no Tq x Tk mask here"
    if why_not(Backend.FLEX, n) is None:
        return Backend.FLEX, f"no flash ({flash}): flex with a block mask"
    return Backend.SDPA, f"no flash ({flash}), no flex: sdpa with a dense mask"


_logged: set[str] = set()


def _log_once(level: int, msg: str) -> None:
    """Log ``msg`` once per process. Skipped while torch.compile traces (a log call there is a graph break);
    ``trainer.compile`` runs the first training step eagerly, so the choice is logged all the same."""
    if torch.compiler.is_compiling() or msg in _logged:
        return
    _logged.add(msg)
    log.log(level, msg)


def choose_backend(
    requested: str | Backend, n: Needs, *, fallback: bool = False, stack: str = "attention"
) -> Backend:
    """The backend that runs ``n``: ``auto``'s choice, or the requested one; raises
    :class:`AttentionBackendError` if the requested one cannot run it, unless ``fallback``."""
    b = parse_backend(requested)
    if b is Backend.AUTO:
        choice, why = auto_backend(n)
        _log_once(logging.INFO, f"attention backend auto -> {choice.value} for the {stack} ({why})")
        return choice
    reason = why_not(b, n)
    if reason is None:
        return b
    if not fallback:
        raise AttentionBackendError(
            f"model.attn_backend={b.value} cannot run the {stack}: {reason}. Use model.attn_backend=auto, or "
            f"model.attn_fallback=true to let auto choose where {b.value} cannot run"
        )
    choice, _ = auto_backend(n)
    _log_once(
        logging.WARNING,
        f"attention backend {b.value} cannot run the {stack} ({reason}); "
        f"model.attn_fallback=true: using {choice.value}",
    )
    return choice


# ----------------------------------------------------------------------------------------------- metadata


@dataclass
class AttnMeta:
    """Everything about masking that every layer of one stack shares in one forward (built by
    :func:`stack_meta`). Only the field of the chosen backend is set."""

    backend: Backend
    causal: bool = True
    window: int = 0
    null_key: bool = False
    sdpa_causal: bool = False  # sdpa: is_causal=True, no mask
    mask: torch.Tensor | None = None  # sdpa: (B|1, 1, Tq|1, Tk[+1]) additive float mask (+1: the null key)
    cu_seqlens: torch.Tensor | None = None  # flash: (n_segments + 1,) int32 offsets into the flattened rows
    max_seqlen: int = 0  # flash: longest segment
    block_mask: Any = None  # flex: BlockMask
    key_bias: torch.Tensor | None = None  # flex: (B, Tk) added by the score_mod


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention will run in: autocast's when it is on for ``x``'s device, else ``x``'s."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def stack_meta(
    x: torch.Tensor,  # (B, Tq, ...) the stack's input: batch, query length, device, dtype, autograd
    backend: str | Backend = Backend.AUTO,
    *,
    stack: str = "attention",  # named in logs and errors ("byte encoder", "word backbone", ...)
    fallback: bool = False,
    causal: bool = True,
    q_offset: int = 0,
    tk: int | None = None,  # key length (default q_offset + Tq: self-attention with a cache)
    doc_ids: torch.Tensor | None = None,  # (B, T) packed-document index
    key_bias: torch.Tensor | None = None,  # (B, Tk) additive, e.g. MrT5 gate values
    key_mask: torch.Tensor | None = None,  # (B, Tk) bool, False = padding
    window: int = 0,
    null_key: bool = False,
) -> AttnMeta:
    """Choose the backend of one stack and build its metadata, once per forward (module docstring)."""
    B, tq = x.shape[0], x.shape[1]
    grad = torch.is_grad_enabled() and (x.requires_grad or (key_bias is not None and key_bias.requires_grad))
    n = Needs(
        device=x.device.type,
        dtype=compute_dtype(x),
        grad=grad,
        causal=causal,
        tq=tq,
        tk=q_offset + tq if tk is None else tk,
        q_offset=q_offset,
        window=window,
        docs=doc_ids is not None,
        key_bias=key_bias is not None,
        key_mask=key_mask is not None,
        null_key=null_key,
    )
    b = choose_backend(backend, n, fallback=fallback, stack=stack)
    meta = AttnMeta(b, causal=causal, window=window, null_key=null_key)
    if b is Backend.FLASH:
        if doc_ids is not None:
            meta.cu_seqlens, meta.max_seqlen = varlen_info(doc_ids)
    elif b is Backend.FLEX:
        if causal or window or doc_ids is not None or key_mask is not None:
            mod = flex_mask_mod(
                causal=causal, q_offset=q_offset, window=window, doc_ids=doc_ids, key_mask=key_mask
            )
            meta.block_mask = make_block_mask(mod, B, n.tq, n.tk, x.device)
        meta.key_bias = key_bias
    else:
        plan = _sdpa_plan(n)
        meta.sdpa_causal = plan == "causal"
        if plan == "mask":
            meta.mask = sdpa_mask(
                B,
                n.tq,
                n.tk,
                dtype=n.dtype,
                device=x.device,
                causal=causal,
                q_offset=q_offset,
                window=window,
                doc_ids=doc_ids,
                key_bias=key_bias,
                key_mask=key_mask,
                null_key=null_key,
            )
    return meta


# ----------------------------------------------------------------------------------------------- kernels


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention for SDPA: query head h reads kv head h // (H // KV) (HF ``repeat_kv``)."""
    H, KV = q.shape[1], k.shape[1]
    if KV == H:
        return k, v
    return k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)


def _sdpa(q, k, v, meta: AttnMeta) -> torch.Tensor:
    k, v = _expand_kv(q, k, v)
    mask = meta.mask
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if meta.null_key:  # softmax1: one all-zero key and value (score q . 0 = 0; zero stays zero under RoPE)
        zero = q.new_zeros(q.shape[0], q.shape[1], 1, q.shape[3])
        k, v = torch.cat([k, zero.to(k.dtype)], dim=2), torch.cat([v, zero.to(v.dtype)], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=meta.sdpa_causal)


def _flash(q, k, v, meta: AttnMeta) -> torch.Tensor:
    kern = load_flash()
    assert kern is not None
    B, H, tq, hd = q.shape
    KV, tk = k.shape[1], k.shape[2]
    w = meta.window
    ws = (w - 1, 0 if meta.causal else w - 1) if w > 0 else (-1, -1)
    qt, kt, vt = (
        t.transpose(1, 2) for t in (q, k, v)
    )  # (B, T, H|KV, hd); flash takes KV < H heads as they are
    if meta.cu_seqlens is None:
        out = kern.func(qt, kt, vt, causal=meta.causal, window_size=ws)
    else:
        cu, m = meta.cu_seqlens, meta.max_seqlen
        out = kern.varlen_func(
            qt.reshape(B * tq, H, hd),
            kt.reshape(B * tk, KV, hd),
            vt.reshape(B * tk, KV, hd),
            cu,
            cu,
            m,
            m,
            causal=meta.causal,
            window_size=ws,
        ).view(B, tq, H, hd)
    return out.transpose(1, 2)


_flex_fns: dict[str, Callable[..., Any]] = {}


def _flex_kernel(device: torch.device) -> Callable[..., Any]:
    """flex_attention, compiled on CUDA (the fused kernel; uncompiled it materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _flex_fns:
        _flex_fns["cuda"] = torch.compile(flex_attention)
    return _flex_fns["cuda"]


def _flex(q, k, v, meta: AttnMeta) -> torch.Tensor:
    from torch.nn.attention.flex_attention import AuxRequest

    fn = _flex_kernel(q.device)
    bias = meta.key_bias
    score_mod = None
    if bias is not None:

        def score_mod(score, b, h, qi, kj):
            return score + bias[b, kj]

    kw: dict[str, Any] = dict(
        score_mod=score_mod, block_mask=meta.block_mask, enable_gqa=k.shape[1] != q.shape[1]
    )
    if not meta.null_key:
        return fn(q, k, v, **kw)
    out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kw)
    return out * torch.sigmoid(aux.lse.float()).unsqueeze(-1).to(
        out.dtype
    )  # S / (S + 1): the null key's share


def attend(
    q: torch.Tensor,  # (B, H, Tq, hd)
    k: torch.Tensor,  # (B, KV, Tk, hd), KV divides H
    v: torch.Tensor,  # (B, KV, Tk, hd)
    meta: AttnMeta | None = None,
    *,
    backend: str | Backend = Backend.AUTO,
    fallback: bool = False,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    window: int = 0,
    null_key: bool = False,
) -> torch.Tensor:  # (B, H, Tq, hd)
    """Scaled dot-product attention on ``meta``'s backend. Without ``meta`` the keyword arguments describe the
    call and its metadata is built here (one-off calls and tests; models build it once per stack)."""
    if meta is None:
        meta = stack_meta(
            q.transpose(1, 2),
            backend,
            fallback=fallback,
            causal=causal,
            q_offset=q_offset,
            tk=k.shape[2],
            doc_ids=doc_ids,
            key_bias=key_bias,
            key_mask=key_mask,
            window=window,
            null_key=null_key,
        )
    if meta.backend is Backend.FLASH:
        return _flash(q, k, v, meta)
    if meta.backend is Backend.FLEX:
        return _flex(q, k, v, meta)
    return _sdpa(q, k, v, meta)
