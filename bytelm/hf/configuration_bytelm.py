"""Hugging Face configuration of every bytelm model (flat, hierarchical, MrT5, byteified).

One ``PretrainedConfig`` subclass holds all fields of ``bytelm.models.config.ModelConfig`` (``gate`` as a
plain dict) so ``config.json`` alone rebuilds the model. ``rope_scaling`` (a transplanted source's RoPE
scaling) is stored as the dict ``bytelm_rope_scaling``: transformers 5 treats ``rope_scaling`` as a deprecated
alias of its own ``rope_parameters`` and would rewrite it. A ``config.json`` written before a field existed
rebuilds with that field's ``ModelConfig`` default. ``num_hidden_layers`` (which ``generate()`` reads),
``hidden_size``, ``num_attention_heads`` and ``max_position_embeddings`` (which lm-evaluation-harness reads)
are aliases of ``n_layers`` / ``d_model`` / ``n_heads`` / ``max_seq_len``.

This file is copied into every exported folder (the import below is rewritten to a relative one), so it must
only import torch, transformers and bytelm's pure-torch model files.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, asdict, fields
from typing import Any

from transformers import PretrainedConfig

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.models.config import GateConfig, ModelConfig, RopeScalingConfig
from bytelm.models.registry import find_spec

BYTELM_MODEL_TYPE = "bytelm"


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
        gate: dict[str, Any] | None = None,
        bytelm_rope_scaling: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # every ModelConfig field, with ModelConfig's default when absent (one definition of the fields)
        for f in fields(ModelConfig):
            if f.name not in ("gate", "rope_scaling"):
                setattr(self, f.name, kwargs.pop(f.name, _default(f)))
        self.gate = dict(gate) if gate is not None else asdict(GateConfig())
        scaling = kwargs.pop(
            "rope_scaling", None
        )  # ModelConfig's name (from_model_config): not transformers' key
        if bytelm_rope_scaling is None and isinstance(scaling, dict) and "kind" in scaling:
            bytelm_rope_scaling = scaling
        self.bytelm_rope_scaling = _rope_dict(bytelm_rope_scaling)
        arch, tie_embeddings = self.arch, self.tie_embeddings
        kwargs.setdefault("pad_token_id", PAD_ID)
        kwargs.setdefault("bos_token_id", BOS_ID)
        kwargs.setdefault("eos_token_id", EOS_ID)
        kwargs.setdefault("tie_word_embeddings", tie_embeddings)
        spec = find_spec(arch)  # None: a kind this code does not know (loading it fails later, naming it)
        seq2seq = spec is not None and spec.seq2seq
        kwargs.setdefault("is_encoder_decoder", seq2seq)
        if seq2seq:
            kwargs.setdefault("decoder_start_token_id", BOS_ID)
        kwargs.setdefault("use_cache", True)
        # transformers 5 keeps these as plain attributes; older versions take them in __init__
        for key in (
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "tie_word_embeddings",
            "use_cache",
            "decoder_start_token_id",
        ):
            if key in kwargs:
                setattr(self, key, kwargs[key])
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        """The bytelm ``ModelConfig`` these fields describe (a field missing from an older config: its
        default)."""
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
