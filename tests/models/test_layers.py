"""The building blocks' own invariants: the KV cache against plain concatenation, the rotation against the
complex-number form of RoPE, and a cached block step against the full forward."""

import torch

from bytelm.models.layers import Block, KVCache, apply_rope, rope_cos_sin


def test_kv_cache_equals_concatenation_across_growth():
    g = torch.Generator().manual_seed(0)
    c = KVCache()
    ks, vs = [], []
    for t in [1, 3, 70, 1, 1, 200, 5]:  # crosses the first capacity (64) and a doubling
        k, v = torch.randn(2, 3, t, 4, generator=g), torch.randn(2, 3, t, 4, generator=g)
        ck, cv = c.append(k, v)
        ks.append(k)
        vs.append(v)
        assert torch.equal(ck, torch.cat(ks, 2)) and torch.equal(cv, torch.cat(vs, 2))
        assert c.length == ck.shape[2] and c.k is not None and torch.equal(c.k, ck)
    early = c.k[:, :, :4].clone()
    c.append(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    assert torch.equal(c.k[:, :, :4], early)  # appending never rewrites what is there
    assert KVCache().k is None and KVCache().length == 0


def test_apply_rope_equals_complex_rotation():
    g = torch.Generator().manual_seed(1)
    hd = 8
    x = torch.randn(1, 2, 5, hd, generator=g)
    pos = torch.tensor([0, 3, 7, 100, 4095])
    cos, sin = rope_cos_sin(pos, hd, 500.0)
    inv = 1.0 / (500.0 ** (torch.arange(hd // 2, dtype=torch.float64) / (hd // 2)))
    z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2 :].double())
    rot = z * torch.polar(torch.ones(5, hd // 2, dtype=torch.float64), pos.double()[:, None] * inv)
    want = torch.cat([rot.real, rot.imag], -1)
    for dt in (torch.float32, torch.bfloat16):
        got = apply_rope(x.to(dt), cos, sin)
        assert got.dtype == dt
        tol = 1e-3 if dt == torch.float32 else 5e-2  # fp32 angles at position 4095: ~2e-4 rad
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol)


def test_cached_block_steps_equal_the_full_forward():
    torch.manual_seed(2)
    b = Block(32, 4, n_kv_heads=2).eval()  # grouped-query attention: q and k rotate together
    x = torch.randn(1, 9, 32)
    cos, sin = rope_cos_sin(torch.arange(9), 8)
    with torch.no_grad():
        full = b(x, cos, sin)
        c = KVCache()
        parts = [b(x[:, a:e], cos[:, :, a:e], sin[:, :, a:e], cache=c) for a, e in [(0, 4), (4, 5), (5, 9)]]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
