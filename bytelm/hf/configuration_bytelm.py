"""Hugging Face configuration of every bytelm model (flat, hierarchical, MrT5, byteified).

One ``PretrainedConfig`` subclass holds all fields of ``bytelm.models.config.ModelConfig`` (``gate`` as a plain
dict) so ``config.json`` alone rebuilds the model. ``rope_scaling`` (a transplanted source's RoPE scaling) is
stored as the dict ``bytelm_rope_scaling``: transformers 5 treats ``rope_scaling`` as a deprecated alias of its
own ``rope_parameters`` and would rewrite it. A ``config.json`` written before a field existed rebuilds with
that field's ``ModelConfig`` default. ``num_hidden_layers`` (which ``generate()`` reads),
``hidden_size``, ``num_attention_heads`` and ``max_position_embeddings`` (which lm-evaluation-harness reads)
are aliases of ``n_layers`` / ``d_model`` / ``n_heads`` / ``max_seq_len``.

This file is copied into every exported folder (the import below is rewritten to a relative one), so it must
only import torch, transformers and bytelm's pure-torch model files.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, asdict, fields
from typing import Any

from transformers import PretrainedConfig

from bytelm.models.config import GateConfig, ModelConfig, RopeScalingConfig

BYTELM_MODEL_TYPE = "bytelm"
_PAD, _BOS, _EOS = 256, 257, 258


class BytelmConfig(PretrainedConfig):
    model_type = BYTELM_MODEL_TYPE
    attribute_map = {
        "num_hidden_layers": "n_layers",
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        arch: str = "flat",
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 8 / 3,
        rope_theta: float = 10000.0,
        max_seq_len: int = 1024,
        vocab_size: int = 320,
        tie_embeddings: bool = False,
        attn_backend: str = "auto",
        init_std: float = 0.02,
        activation_checkpointing: bool = False,
        d_byte: int = 128,
        n_heads_byte: int = 4,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        encoder_window: int = 0,
        pooling: str = "query",
        decoder_cross: str = "first",
        chunker: str = "words",
        max_word_bytes: int = 100,
        gate: dict[str, Any] | None = None,
        gate_enabled: bool = True,
        prefix_frac: float = 0.5,
        n_kv_heads: int = 0,
        head_dim: int = 0,
        mlp_hidden: int = 0,
        norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        bytelm_rope_scaling: dict[str, Any] | None = None,
        backbone_window: int = 0,
        source_vocab: int = 0,
        source_vocab_bytes: int = 0,
        source_start_id: int = 0,
        source_tied: bool = True,
        lm_prior: bool = True,
        boundary_hidden: int = 0,
        **kwargs: Any,
    ) -> None:
        self.arch = arch
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.mlp_ratio = mlp_ratio
        self.rope_theta = rope_theta
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.tie_embeddings = tie_embeddings
        self.attn_backend = attn_backend
        self.init_std = init_std
        self.activation_checkpointing = activation_checkpointing
        self.d_byte = d_byte
        self.n_heads_byte = n_heads_byte
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_window = encoder_window
        self.pooling = pooling
        self.decoder_cross = decoder_cross
        self.chunker = chunker
        self.max_word_bytes = max_word_bytes
        self.gate = dict(gate) if gate is not None else asdict(GateConfig())
        self.gate_enabled = gate_enabled
        self.prefix_frac = prefix_frac
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.mlp_hidden = mlp_hidden
        self.norm_eps = norm_eps
        self.qkv_bias = qkv_bias
        scaling = kwargs.pop("rope_scaling", None)  # ModelConfig's name (from_model_config): not transformers' key
        if bytelm_rope_scaling is None and isinstance(scaling, dict) and "kind" in scaling:
            bytelm_rope_scaling = scaling
        self.bytelm_rope_scaling = _rope_dict(bytelm_rope_scaling)
        self.backbone_window = backbone_window
        self.source_vocab = source_vocab
        self.source_vocab_bytes = source_vocab_bytes
        self.source_start_id = source_start_id
        self.source_tied = source_tied
        self.lm_prior = lm_prior
        self.boundary_hidden = boundary_hidden
        kwargs.setdefault("pad_token_id", _PAD)
        kwargs.setdefault("bos_token_id", _BOS)
        kwargs.setdefault("eos_token_id", _EOS)
        kwargs.setdefault("tie_word_embeddings", tie_embeddings)
        kwargs.setdefault("is_encoder_decoder", arch == "mrt5")
        if arch == "mrt5":
            kwargs.setdefault("decoder_start_token_id", _BOS)
        kwargs.setdefault("use_cache", True)
        # transformers 5 keeps these as plain attributes; older versions take them in __init__
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "use_cache",
                    "decoder_start_token_id"):
            if key in kwargs:
                setattr(self, key, kwargs[key])
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        """The bytelm ``ModelConfig`` these fields describe (a field missing from an older config: its default)."""
        gate_names = {f.name for f in fields(GateConfig)}
        gate = GateConfig(**{k: v for k, v in (self.gate or {}).items() if k in gate_names})
        rope = _rope_dict(getattr(self, "bytelm_rope_scaling", None))
        values = {
            f.name: getattr(self, f.name, _default(f))
            for f in fields(ModelConfig)
            if f.name not in ("gate", "rope_scaling")
        }
        return ModelConfig(**values, gate=gate, rope_scaling=RopeScalingConfig(**rope))

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> BytelmConfig:
        d = asdict(cfg)
        d["bytelm_rope_scaling"] = d.pop("rope_scaling")
        d.update(kwargs)
        return cls(**d)


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"ModelConfig.{f.name} has no default")


def _rope_dict(d: dict[str, Any] | None) -> dict[str, Any]:
    """``RopeScalingConfig`` fields as a plain dict (defaults for missing keys; unknown keys dropped)."""
    names = {f.name for f in fields(RopeScalingConfig)}
    return asdict(RopeScalingConfig(**{k: v for k, v in (d or {}).items() if k in names}))
