"""Transformer building blocks shared by every bytelm model: RMSNorm, RoPE, SwiGLU, attention, Block.

Pure torch. Llama-style: pre-norm, rotary positions (with the optional ``linear`` / ``llama3`` frequency
scaling of a transplanted source model), SwiGLU MLP, grouped-query attention when ``n_kv_heads < n_heads``.
No bias in the norms, the MLP or the attention output; the q/k/v projection has one only with
``qkv_bias=True`` (a transplanted source model that has them, e.g. Qwen2; bytelm's own models keep the default
``False``). Attention goes through the single entry point in ``attention.py`` so the backend (SDPA / flash /
flex) is a config choice, not a code path here; a model builds each stack's ``AttnMeta`` once per forward and
passes it to every block of the stack. ``KVCache`` holds one layer's keys and values for cached decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bytelm.models.attention import AttnMeta, attend, stack_meta
from bytelm.models.config import RopeScalingConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain and no bias (Llama, T5)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(
    head_dim: int,
    theta: float = 10000.0,
    scaling: RopeScalingConfig | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(head_dim // 2,) fp32 inverse frequencies ``theta ** (-2i / head_dim)``, scaled as a Llama-family
    source model scales them: ``linear`` divides every frequency by ``factor`` (= positions / factor);
    ``llama3`` (Llama 3.1) leaves high frequencies (wavelength < original_max_position / high_freq_factor)
    alone, divides low ones (wavelength > original_max_position / low_freq_factor) by ``factor`` and
    interpolates in between with
    ``s = (original_max_position / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``:
    ``(1 - s) * f / factor + s * f``."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    kind = "none" if scaling is None else scaling.kind
    if kind == "none":
        return inv_freq
    assert scaling is not None
    if kind == "linear":
        return inv_freq / scaling.factor
    if kind == "llama3":
        lo, hi, old = scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_position
        wavelen = 2 * math.pi / inv_freq
        low = wavelen > old / lo  # long wavelengths: interpolate positions by `factor`
        high = wavelen < old / hi  # short wavelengths: unchanged
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        return torch.where(low, inv_freq / scaling.factor, torch.where(high, inv_freq, mid))
    raise ValueError(f"unsupported rope scaling kind {kind!r} (none | linear | llama3)")


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _cached_inv_freq(
    head_dim: int, theta: float, scaling: RopeScalingConfig | None, device: torch.device
) -> torch.Tensor:
    """``rope_inv_freq`` memoised per (shape, scaling, device): cached decoding asks for one position at a
    time, and rebuilding the table costs more than the rotation."""
    key = (
        head_dim,
        float(theta),
        None if scaling is None else tuple(sorted(vars(scaling).items())),
        str(device),
    )
    inv = _INV_FREQ.get(key)
    if inv is None:
        inv = _INV_FREQ[key] = rope_inv_freq(head_dim, theta, scaling, device)
    return inv


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for arbitrary integer positions.

    positions: (T,) or (B, T). Returns cos, sin of shape (B|1, 1, T, head_dim // 2), ready to broadcast over
    heads. Positions are explicit (not ``arange``) because the hierarchical pooling places a word query at its
    word index and the keys at byte positions, and KV-cached decoding continues from an offset. ``scaling``
    (a transplanted source model's ``rope_scaling``) rescales the frequencies (``rope_inv_freq``).
    """
    inv_freq = _cached_inv_freq(head_dim, theta, scaling, positions.device)
    pos = positions.to(torch.float32)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    angles = pos.unsqueeze(-1) * inv_freq  # (B, T, half)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim. x: (B, H, T, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()  # no copies in fp32
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int = 32) -> int:
    """Hidden width of the SwiGLU MLP, rounded up to a multiple for efficient kernels."""
    hidden = int(dim * mlp_ratio)
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


@dataclass
class KVCache:
    """Keys and values of one attention layer for the positions processed so far. ``k``, ``v``: (B, KV, S, hd)
    (the KV heads: with grouped-query attention fewer than the query heads).

    Stored in buffers with spare room along S (doubled when full), so appending one position writes it in
    place instead of copying the whole cache (``torch.cat`` per step made decoding quadratic in copies);
    ``k`` / ``v`` are views of the filled part. A dataclass, so code that selects batch rows of every tensor
    in a cache (beam search in the Hugging Face export) reaches the buffers."""

    kbuf: torch.Tensor | None = None  # (B, KV, capacity, hd)
    vbuf: torch.Tensor | None = None
    n: int = 0  # positions filled

    @property
    def k(self) -> torch.Tensor | None:
        return None if self.kbuf is None else self.kbuf[:, :, : self.n]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self.vbuf is None else self.vbuf[:, :, : self.n]

    @property
    def length(self) -> int:
        return self.n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, KV, T, hd) keys and values; returns the whole cache's (B, KV, S + T, hd) views."""
        n, t = self.n, k.shape[2]
        if self.kbuf is None or self.vbuf is None or n + t > self.kbuf.shape[2]:
            cap = max(64, 2 * (n + t))
            nk = k.new_empty(*k.shape[:2], cap, k.shape[3])
            nv = v.new_empty(*v.shape[:2], cap, v.shape[3])
            if self.kbuf is not None and self.vbuf is not None and n:
                nk[:, :, :n] = self.kbuf[:, :, :n]
                nv[:, :, :n] = self.vbuf[:, :, :n]
            self.kbuf, self.vbuf = nk, nv
        self.kbuf[:, :, n : n + t] = k
        self.vbuf[:, :, n : n + t] = v
        self.n = n + t
        return self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE and an optional KV cache.

    Grouped-query attention when ``n_kv_heads < n_heads``: the fused projection's rows are
    ``[q (H*hd); k (KV*hd); v (KV*hd)]``, the cache stores the KV heads, and ``attend`` serves them as they
    are (flash, flex) or expanded to H heads (SDPA) with the HF ``repeat_kv`` convention (query head h reads
    kv head h // (H // KV)). With the defaults (KV = H, hd = dim // H, no bias) names and shapes are those of
    every earlier bytelm checkpoint."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        backend: str = "auto",  # used only by calls without a stack's AttnMeta
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if not head_dim and dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by n_heads={n_heads}")
        kv = n_kv_heads or n_heads
        if n_heads % kv:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={kv}")
        self.n_heads, self.n_kv_heads = n_heads, kv
        self.head_dim = head_dim or dim // n_heads
        self.backend = backend
        self.wqkv = nn.Linear(dim, (n_heads + 2 * kv) * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta | None = None,  # the stack's attention metadata (attention.stack_meta)
        *,
        cache: KVCache | None = None,
        **features: object,  # without meta: attention.stack_meta's keywords (causal, doc_ids, window, ...)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, hd)
        qk = apply_rope(qkv[:, :, : H + KV].transpose(1, 2), cos, sin)  # (B, H + KV, T, hd): one rotation
        q, k = qk[:, :H], qk[:, H:]  # (B, H, T, hd), (B, KV, T, hd)
        v = qkv[:, :, H + KV :].transpose(1, 2)
        q_offset = 0
        if cache is not None:
            q_offset = cache.length
            k, v = cache.append(k, v)  # (B, KV, S, hd)
        if meta is None:  # a one-off call: metadata for this layer alone
            meta = stack_meta(x, self.backend, q_offset=q_offset, tk=k.shape[2], **features)  # type: ignore[arg-type]
        out = attend(q, k, v, meta)  # (B, H, T, hd); grouped KV heads are expanded by the backend
        return self.wo(out.transpose(1, 2).reshape(B, T, H * hd))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    The keyword-only arguments describe a Llama-family source model's blocks (GQA, head width, MLP width, norm
    eps, q/k/v biases); their defaults give bytelm's own blocks."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        mlp_ratio: float = 8 / 3,
        backend: str = "auto",
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        mlp_hidden: int | None = None,
        norm_eps: float = 1e-6,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = SelfAttention(
            dim, n_heads, backend, n_kv_heads=n_kv_heads, head_dim=head_dim, qkv_bias=qkv_bias
        )
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden or swiglu_hidden(dim, mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta | None = None,
        **attn_kwargs,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, meta, **attn_kwargs)
        return x + self.mlp(self.mlp_norm(x))


def init_linear_(module: nn.Module, std: float = 0.02, out_std: float | None = None) -> None:
    """Normal(0, std) init for every Linear/Embedding; residual output projections (``wo``, ``w_down``)
    get ``out_std`` (GPT-2 / Llama practice: std / sqrt(2 * n_layers)) so the residual stream stays O(1)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            s = out_std if (out_std is not None and name.split(".")[-1] in ("wo", "w_down")) else std
            nn.init.normal_(m.weight, mean=0.0, std=s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()
