"""Typed model configuration shared by every architecture, and the output every model returns.

One dataclass (not one per architecture) so Hydra's structured config can type-check the ``model`` group:
a misspelt key fails with its name. Fields that an architecture does not use are ignored by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import Enum

import torch

from bytelm.choices import CHOICES, choice
from bytelm.data.bytes import PADDED_VOCAB


class RegisteredArchs(Sequence[str]):
    """``model.arch``'s allowed values: the kinds registered now (``bytelm.models.registry``), read when
    checked."""

    @staticmethod
    def _names() -> tuple[str, ...]:
        from bytelm.models.registry import registered_archs  # not at import: the registry may import models

        return registered_archs()

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


class Backend(str, Enum):
    """Attention backends (bytelm.models.attention). Defined here, not there, so importing the config does not
    import the attention code (its compiler decorators load torch._dynamo: ~1.5 s on every CLI start)."""

    AUTO = "auto"
    SDPA = "sdpa"
    FLASH = "flash"
    FLEX = "flex"


ATTN_BACKENDS: tuple[str, ...] = tuple(b.value for b in Backend)  # the valid values of model.attn_backend


@dataclass
class GateConfig:
    """MrT5 delete gate and its PI controller (docs/design.md#mrt5-delete-gate, docs/mrt5.md)."""

    layer: int = 2  # gate reads the input of encoder block `layer` (0-based); MrT5 code default 2
    k: float = -30.0  # G = k * sigmoid(-(RMSNorm(h) @ w + b))
    bias_init: float = 1.0  # b = +1 -> G starts near -30 * sigmoid(-1) = -8.1 (keep side)
    tau_del: float = -15.0  # hard deletion: keep positions with G > tau_del
    target_ratio: float = 0.5  # delta: target fraction of deleted positions
    kp: float = 0.5
    ki: float = 1e-5
    hard_eval: bool = False  # use hard deletion in validation (inference always may)
    softmax1: bool = True  # null key (softmax1) in the layers the gate bias reaches (also with the gate off)
    # from-scratch recipe (docs/mrt5.md); the defaults are the paper's gate and controller
    center: bool = False  # gate reads h minus its mean over the row's real positions
    alpha_min: float = 0.0  # lower clamp of alpha; < 0 makes the PI controller two-sided


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling of a transplanted source model (HF ``rope_scaling`` / ``rope_parameters``)."""

    kind: str = choice(
        "none", "none", "linear", "llama3"
    )  # HF "rope_type"; others are an error naming the value
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3: original_max_position_embeddings

    def __post_init__(self) -> None:
        if self.kind not in ("none", "linear", "llama3"):
            raise ValueError(
                f"model.rope_scaling.kind must be 'none', 'linear' or 'llama3', got {self.kind!r}"
            )


@dataclass
class ModelConfig:
    arch: str = field(default="flat", metadata={CHOICES: RegisteredArchs()})  # bytelm.models.registry
    # backbone (the flat model's only stack)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 8 / 3
    rope_theta: float = 10000.0
    max_seq_len: int = 1024  # bytes
    vocab_size: int = PADDED_VOCAB
    tie_embeddings: bool = False
    attn_backend: str = choice("auto", *ATTN_BACKENDS)  # auto | sdpa | flash | flex (bytelm.models.attention)
    attn_fallback: bool = (
        False  # an explicit backend that cannot run a stack: error (False) or auto's choice there
    )
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # Llama-family backbone details: bytelm's own models keep the defaults; a transplanted source model sets
    # them from its config (bytelm.distill.transplant.source_fields). They apply to the backbone stack only.
    n_kv_heads: int = 0  # 0 = n_heads; fewer = grouped-query attention
    head_dim: int = 0  # 0 = d_model // n_heads
    mlp_hidden: int = 0  # 0 = swiglu_hidden(d_model, mlp_ratio)
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    backbone_window: int = (
        0  # sliding window of the backbone over words (0 = full causal; Mistral's sliding_window)
    )
    # byte-level stacks of the hierarchical / MrT5 models
    d_byte: int = 128
    n_heads_byte: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    encoder_window: int = 0  # sliding-window size of the byte encoder (0 = full causal)
    pooling: str = choice(
        "query", "query", "last"
    )  # query (HAT: learned query cross-attends to the word's bytes) | last
    decoder_cross: str = choice(
        "first", "first", "all"
    )  # decoder layers that receive the previous word's vector
    # words (rule-based splitter) | gate (learned boundaries: the MrT5 delete gate for arch=hierarchical,
    # chunking.py; the boundary predictor for arch=byteified, byteified.py)
    chunker: str = choice("words", "words", "gate")
    max_word_bytes: int = 100
    gate: GateConfig = field(default_factory=GateConfig)
    gate_enabled: bool = True  # MrT5: False trains the same encoder-decoder without the delete gate
    prefix_frac: float = 0.5  # MrT5 prefix-LM: share of each row's bytes given to the encoder
    # byteified models (arch=byteified; bytelm.distill.byteify fills these from the source LM before building)
    source_vocab: int = 0  # rows of the source model's token embedding (expanded input ids, LM-head prior)
    source_vocab_bytes: int = 0  # total bytes of the source vocabulary's token strings (a buffer's shape)
    source_start_id: int = 0  # the source's document-start token: specials and the row-start sink embed as it
    source_tied: bool = True  # the source's LM head is its input embedding
    # add the source LM head's exact (byte, ends-patch) log-prior to the fused logits (byte_prior.py)
    lm_prior: bool = True
    patch_token_embed: bool = True  # patch vector = source embedding of the patch's token + pooled correction
    boundary_hidden: int = (
        0  # boundary predictor: 0 = linear probe of the encoder state, > 0 = an MLP this wide
    )
    boundary_lookahead: int = (
        1  # boundary predictor: the decision for byte t reads the states of bytes t..t+this
    )
    boundary_threshold: float = (
        0.0  # boundary_decode=threshold: a patch ends where the logit exceeds this (< 0: shorter patches)
    )
    # how the boundary logits become patch ends: each byte against boundary_threshold, or the most likely
    # segmentation into source vocabulary tokens (bytelm/models/vocab_segment.py)
    boundary_decode: str = choice("threshold", "threshold", "vocab")
    boundary_patch_cost: float = 2.0  # boundary_decode=vocab: nats charged per patch (> 0: fewer patches)
    # byteified, chunker=gate: the boundary predictor reads its own copy of the byte embedding and encoder, a
    # frozen snapshot of the encoder taken when stage 1 starts from a boundary-phase checkpoint, so later
    # stages cannot move the boundaries (docs/byteify.md, "Segmenters")
    segmenter_encoder: bool = False

    def __post_init__(self) -> None:
        # a config rebuilt from a flat dict (HF export's config.json) carries the nested scaling as a dict
        # (HF's PretrainedConfig may add its own keys such as rope_type / rope_theta to it: those are not
        # ours)
        if isinstance(self.rope_scaling, dict):
            names = {f.name for f in fields(RopeScalingConfig)}
            self.rope_scaling = RopeScalingConfig(
                **{k: v for k, v in self.rope_scaling.items() if k in names}
            )


@dataclass
class ModelOutput:
    """What every model's ``forward`` returns.

    ``logits`` (B, T, V) predict ``targets``; a model whose objective is not plain next-byte prediction
    (e.g. MrT5's prefix-LM) sets ``loss`` itself. ``aux_loss`` is added to the training loss (gate
    regulariser); ``metrics`` are scalars logged every step (words per byte, deletion ratio, ...).
    ``hidden`` holds optional internal tensors for auxiliary objectives (the hierarchical model: ``words``
    (B, W, d_model) backbone outputs, ``word_start`` / ``word_end`` (B, W) their input positions).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
