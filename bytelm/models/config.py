"""Typed model configuration shared by every architecture, and the output every model returns.

One dataclass (not one per architecture) so Hydra's structured config can type-check the ``model`` group:
a misspelt key fails with its name. Fields that an architecture does not use are ignored by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bytelm.data.bytes import PADDED_VOCAB


@dataclass
class GateConfig:
    """MrT5 delete gate (DESIGN.md §2)."""

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
class ModelConfig:
    arch: str = "flat"  # flat | hierarchical | mrt5
    # backbone (the flat model's only stack)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 8 / 3
    rope_theta: float = 10000.0
    max_seq_len: int = 1024  # bytes
    vocab_size: int = PADDED_VOCAB
    tie_embeddings: bool = False
    attn_backend: str = "sdpa"  # sdpa | flash | flex
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # byte-level stacks of the hierarchical / MrT5 models
    d_byte: int = 128
    n_heads_byte: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    encoder_window: int = 0  # sliding-window size of the byte encoder (0 = full causal)
    pooling: str = "query"  # query (HAT: learned query cross-attends to the word's bytes) | last
    decoder_cross: str = "first"  # first | all: decoder layers that receive the previous word's vector
    chunker: str = "words"  # words (rule-based splitter) | gate (learned delete gate)
    max_word_bytes: int = 100
    gate: GateConfig = field(default_factory=GateConfig)
    gate_enabled: bool = True  # MrT5: False trains the same encoder-decoder without the delete gate
    prefix_frac: float = 0.5  # MrT5 prefix-LM: share of each row's bytes given to the encoder


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
