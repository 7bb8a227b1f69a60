"""Training FLOPs per byte and parameter counts, for equal-compute comparisons and MFU.

Per unit of a stack (a byte for byte-level stacks, a word for the backbone), training costs
``6 * N`` FLOPs for the ``N`` matmul weights the unit touches (forward 2N, backward 4N) plus
``12 * L * d * ctx`` for attention over ``ctx`` keys in ``L`` layers of width ``d`` (Kaplan et al. / PaLM
convention: the full context, causal masking not halved). The embedding lookup costs nothing; the output head
is a matmul and counts; norm gains are ignored. For the hierarchical model, per-word costs are divided by the
number of bytes per word, so the backbone's share of a byte shrinks with longer words.
"""

from __future__ import annotations

from torch import nn

from bytelm.models.config import ModelConfig
from bytelm.models.layers import swiglu_hidden
from bytelm.models.registry import get_spec, resolve

DEFAULT_BYTES_PER_WORD = (
    4.5  # HAT splitter on the Shakespeare training split (scripts/bench_models.py measures it)
)


def block_matmul_params(dim: int, mlp_ratio: float) -> int:
    """Matmul weights of one ``Block``: wqkv + wo (4 d^2) and SwiGLU (3 d h)."""
    return 4 * dim * dim + 3 * dim * swiglu_hidden(dim, mlp_ratio)


def flat_flops(
    cfg: ModelConfig, seq_len: int, bytes_per_word: float = DEFAULT_BYTES_PER_WORD
) -> dict[str, float]:
    """The flat model's training FLOPs per byte, by part (``bytes_per_word`` does not matter)."""
    V, r = cfg.vocab_size, cfg.mlp_ratio
    D, L = cfg.d_model, cfg.n_layers
    return {
        "blocks": 6.0 * L * block_matmul_params(D, r),
        "attention": 12.0 * L * D * seq_len,
        "lm_head": 6.0 * D * V,
    }


def hierarchical_flops(
    cfg: ModelConfig, seq_len: int, bytes_per_word: float = DEFAULT_BYTES_PER_WORD
) -> dict[str, float]:
    """The hierarchical model's training FLOPs per byte, by part."""
    V, r = cfg.vocab_size, cfg.mlp_ratio
    D, d, bpw = cfg.d_model, cfg.d_byte, float(bytes_per_word)
    Le, Ld, Lb = cfg.encoder_layers, cfg.decoder_layers, cfg.n_layers
    enc_ctx = min(seq_len, cfg.encoder_window) if cfg.encoder_window > 0 else seq_len
    words = seq_len / bpw
    n_inj = Ld if cfg.decoder_cross == "all" else 1
    out = {
        "encoder": 6.0 * Le * block_matmul_params(d, r),
        "encoder_attention": 12.0 * Le * d * enc_ctx,
        "backbone": 6.0 * Lb * block_matmul_params(D, r) / bpw,
        "backbone_attention": 12.0 * Lb * D * words / bpw,
        "decoder": 6.0 * Ld * block_matmul_params(d, r),
        "decoder_attention": 12.0 * Ld * d * seq_len,
        "decoder_context": 6.0 * n_inj * D * d / bpw,  # word vector -> byte width, once per word
        "lm_head": 6.0 * d * V,
    }
    if cfg.pooling == "query":
        out["pooling"] = 6.0 * 2 * d * D + 6.0 * D * D / bpw  # keys+values per byte, output per word
        out["pooling_attention"] = 12.0 * D  # each byte is a key of exactly one query
    else:
        out["pooling"] = 6.0 * d * D / bpw
    return out


def flops_breakdown(
    cfg: ModelConfig, seq_len: int, bytes_per_word: float = DEFAULT_BYTES_PER_WORD
) -> dict[str, float]:
    """Training FLOPs per byte, by part, from the formula of ``cfg.arch``'s spec (``ModelSpec.flops``).
    ``seq_len`` is the context in bytes. A kind without a formula is a ValueError."""
    spec = get_spec(cfg.arch)
    if spec.flops is None:
        raise ValueError(
            f"flops_per_byte does not know arch {cfg.arch!r} (its ModelSpec has no flops formula)"
        )
    return dict(resolve(spec.flops)(cfg, seq_len, bytes_per_word))


def flops_per_byte(cfg: ModelConfig, seq_len: int, bytes_per_word: float = DEFAULT_BYTES_PER_WORD) -> float:
    """Training (forward + backward) FLOPs per byte (kinds with a formula: flat, hierarchical)."""
    return float(sum(flops_breakdown(cfg, seq_len, bytes_per_word).values()))


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters of ``model`` (shared tensors once); ``non_embedding`` leaves out input embedding tables
    (an output head tied to one is then left out too)."""
    seen: set[int] = set()
    if non_embedding:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                seen.add(id(m.weight))
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def flat_param_estimate(cfg: ModelConfig) -> int:
    head = 0 if cfg.tie_embeddings else 1
    return (
        cfg.n_layers * block_matmul_params(cfg.d_model, cfg.mlp_ratio) + head * cfg.d_model * cfg.vocab_size
    )


def hierarchical_param_estimate(cfg: ModelConfig) -> int:
    r, V = cfg.mlp_ratio, cfg.vocab_size
    head = 0 if cfg.tie_embeddings else 1
    D, d = cfg.d_model, cfg.d_byte
    pool = 2 * d * D + D * D if cfg.pooling == "query" else d * D
    n_inj = cfg.decoder_layers if cfg.decoder_cross == "all" else 1
    return (
        (cfg.encoder_layers + cfg.decoder_layers) * block_matmul_params(d, r)
        + cfg.n_layers * block_matmul_params(D, r)
        + pool
        + n_inj * D * d
        + head * d * V
    )


def param_count_estimate(cfg: ModelConfig) -> int:
    """Matmul weights of the model from the config alone (no embedding, no norm gains)."""
    spec = get_spec(cfg.arch)
    if spec.param_estimate is None:
        raise ValueError(f"param_count_estimate does not know arch {cfg.arch!r}")
    return int(resolve(spec.param_estimate)(cfg))


def mfu(flops_per_byte_: float, bytes_per_s: float, peak_flops_total: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used."""
    if not peak_flops_total or peak_flops_total <= 0:
        return None
    return flops_per_byte_ * bytes_per_s / peak_flops_total
