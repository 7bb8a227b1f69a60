"""The model registry: one ``ModelSpec`` per model kind (``model.arch``), and the only place that knows them.

Everything the rest of bytelm needs to know about a kind is a field of its spec: training, evaluation, export
and distillation read the spec of ``cfg.model.arch`` (``get_spec``) and never branch on its name. Adding a
kind is one ``register_model(ModelSpec(...))`` call (docs/extending.md); the built-in kinds are registered at
the end of this module, so importing ``bytelm.models`` (or anything below it) registers them.

This module is pure Python + torch (no lightning, deepspeed, hydra or wandb), and it is shipped inside every
exported Hugging Face folder (``bytelm.models.build`` imports it), so:

- a built-in kind's model class is loaded on first use (``ModelSpec.model`` may be a function returning the
  class): importing the registry does not import every model;
- the training-side hooks (config completion, pretrained weights, parameter groups, FLOPs, the kind's own
  objective) are ``Ref``\\ s: a callable, or a ``"package.module:function"`` string imported when it is used
  (never in an exported folder).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from bytelm.models.config import ModelConfig

Ref = str | Callable[..., Any]  # a callable, or "package.module:attribute" imported when first used


def resolve(ref: Ref) -> Callable[..., Any]:
    """The callable ``ref`` names (``"package.module:attribute"`` is imported here)."""
    if callable(ref):
        return ref
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"a reference must be a callable or 'package.module:attribute', got {ref!r}")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def _never(cfg: ModelConfig) -> bool:
    return False


@dataclass(frozen=True)
class ModelSpec:
    """What bytelm knows about one model kind. Only ``arch`` and ``model`` are required.

    The class must take a ``ModelConfig`` and provide ``init_weights()``, ``forward(input_ids, targets=,
    doc_ids=, word_start=, **batch_keys) -> ModelOutput`` and, for generation, ``new_cache()``
    (docs/extending.md).
    """

    arch: str  # the model.arch value
    model: Any  # the nn.Module class, or a function of no arguments returning it (loaded on first use)
    description: str = ""  # one phrase for the exported model card ("a flat byte-level transformer ...")
    # --- decoding and Hugging Face export (plain values: the exported folder reads them too)
    seq2seq: bool = False  # encoder-decoder (prefix-LM): logits cover the continuation after the prefix only
    hf_class: str = "BytelmForCausalLM"  # its class in bytelm.hf.modeling_bytelm
    auto_class: str = "AutoModelForCausalLM"  # the transformers auto class that loads the exported folder
    batched_cache: bool = False  # one ``new_cache()`` may hold a whole unpadded batch (else one per row)
    compilable: bool = True  # trainer.compile compiles its training forward (bytelm.models.compile)
    # --- data and scoring
    needs_words: Callable[[ModelConfig], bool] = _never  # (cfg) -> wants batch["word_start"] from the data
    batch_keys: tuple[str, ...] = ()  # further batch keys its training forward takes, passed when present
    word_vectors: bool = False  # ModelOutput.hidden["words"]: per-word vectors (distillation's latent loss)
    # --- building and training (Refs: resolved when used, never in an exported folder)
    complete_config: Ref | None = None  # (cfg: Config) -> None, before building: fills derived model fields
    load_pretrained: Ref | None = None  # (model, cfg: Config, strategy_kind: str) -> None, after init_weights
    param_groups: Ref | None = None  # (model, groups, cfg: Config) -> groups: its own optimiser groups
    objective: Ref | None = None  # (module, cfg: Config) -> None: attaches its own losses (distill=none)
    flops: Ref | None = None  # (cfg: ModelConfig, seq_len, bytes_per_word) -> {part: training FLOPs per byte}
    param_estimate: Ref | None = None  # (cfg: ModelConfig) -> matmul weights from the config alone
    flops_per_word: bool = False  # its FLOPs depend on the bytes per word (the backbone runs per word)
    # --- the exported model card
    card_generation: str = ""  # appended to "Generation keeps bytelm's own KV cache"
    card_sections: tuple[str, ...] = ()  # further markdown sections (after the usage example)

    def __post_init__(self) -> None:
        if not self.arch or not self.arch.isidentifier():
            raise ValueError(f"ModelSpec.arch must be a plain name (letters, digits, _), got {self.arch!r}")
        if self.model is None:
            raise ValueError(f"ModelSpec {self.arch!r}: model (the class) is required")

    def model_class(self) -> type[nn.Module]:
        """The model class (imports its module on first use)."""
        m = self.model
        return m if isinstance(m, type) else m()  # type: ignore[no-any-return]

    @property
    def builtin(self) -> bool:
        """One of bytelm's own specs (whose model code every exported folder ships)."""
        return any(self is s for s in BUILTIN_SPECS)


_SPECS: dict[str, ModelSpec] = {}


def _changed() -> None:
    """The set of kinds changed: the config schema (model.arch's allowed values) is rebuilt on next use."""
    from bytelm.choices import schema_of

    schema_of.cache_clear()


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Make ``spec.arch`` a valid ``model.arch``. Registering a taken name is an error unless ``replace``."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model takes a ModelSpec, got {type(spec).__name__}")
    if spec.arch in _SPECS and not replace:
        raise ValueError(f"model.arch {spec.arch!r} is already registered (pass replace=True to replace it)")
    _SPECS[spec.arch] = spec
    _changed()
    return spec


def unregister_model(arch: str) -> None:
    """Remove a registered kind (tests; the built-in kinds cannot be removed)."""
    if arch in ARCHS:
        raise ValueError(f"{arch!r} is a built-in model kind and cannot be unregistered")
    if _SPECS.pop(arch, None) is not None:
        _changed()


def registered_archs() -> tuple[str, ...]:
    """Every valid ``model.arch``, built-in kinds first."""
    return tuple(_SPECS)


def find_spec(arch: str) -> ModelSpec | None:
    return _SPECS.get(arch)


def get_spec(arch: str) -> ModelSpec:
    """The spec of ``arch``; an unknown name is an error that lists the known ones."""
    spec = _SPECS.get(arch)
    if spec is None:
        raise ValueError(
            f"unknown model.arch {arch!r}; choose one of {', '.join(_SPECS)} "
            "(or register a new kind with bytelm.models.registry.register_model: docs/extending.md)"
        )
    return spec


# ------------------------------------------------------------------------------------------ built-in kinds
# Each class is imported by a function (not here), so the registry loads no model; the imports are plain
# ``from bytelm.models.<module> import`` statements so the exported folder's copy rewrites them to its own
# files.


def _flat() -> type:
    from bytelm.models.flat import FlatByteLM

    return FlatByteLM


def _hierarchical() -> type:
    from bytelm.models.hierarchical import HierarchicalByteLM

    return HierarchicalByteLM


def _mrt5() -> type:
    from bytelm.models.mrt5 import MrT5

    return MrT5


def _byteified() -> type:
    from bytelm.models.byteified import ByteifiedLM

    return ByteifiedLM


def _word_splitter(cfg: ModelConfig) -> bool:
    return cfg.chunker == "words"


_BYTEIFIED_SCORING = (
    "## Scoring\n\n"
    "`model(ids).logits` are next-byte logits with every patch boundary chosen by the model's own head from "
    "the bytes before it, so a plain cross-entropy on them (lm-evaluation-harness) is an honest score. "
    "`model(ids, segment=True)` runs the learned boundary predictor instead (or pass your own "
    "`patch_end=`): its `logits` are the fused (byte, ends-the-patch) symbols, 2 x the vocabulary, and "
    "`boundary_bits` the boundaries used; score the symbol `byte + V * bit` of each next byte (bytelm's "
    'bits per byte; see bytelm\'s docs/byteify.md, "Honest scoring").'
)

BUILTIN_SPECS = (
    ModelSpec(
        arch="flat",
        model=_flat,
        description="a flat byte-level transformer (Llama-style: RMSNorm, RoPE, SwiGLU) over raw UTF-8 bytes",
        batched_cache=True,
        flops="bytelm.models.flops:flat_flops",
        param_estimate="bytelm.models.flops:flat_param_estimate",
    ),
    ModelSpec(
        arch="hierarchical",
        model=_hierarchical,
        description=(
            "a hierarchical byte-level LM (HAT-style): a byte encoder, word pooling, a latent backbone over "
            "words and a byte decoder; words are split by a rule-based splitter, online while generating"
        ),
        needs_words=_word_splitter,
        word_vectors=True,
        flops="bytelm.models.flops:hierarchical_flops",
        param_estimate="bytelm.models.flops:hierarchical_param_estimate",
        flops_per_word=True,
        card_generation=" (the word-level state of the hierarchical model included)",
    ),
    ModelSpec(
        arch="mrt5",
        model=_mrt5,
        description=(
            "MrT5: a byte-level encoder-decoder with a learned delete gate that shortens the encoder sequence"
        ),
        seq2seq=True,
        hf_class="BytelmForSeq2SeqLM",
        auto_class="AutoModelForSeq2SeqLM",
    ),
    ModelSpec(
        arch="byteified",
        model=_byteified,
        description=(
            "a byteified subword LM: a hierarchical byte-level LM whose backbone is a source LM's "
            "transplanted decoder blocks, with a byte encoder (plus the source's embedding of the longest "
            "vocabulary token ending at each byte), a learned patch-boundary predictor and a byte decoder "
            "whose fused head predicts (byte, ends-the-patch) symbols from the source LM head's exact "
            "prior; the source vocabulary and its frozen embeddings ship in the weights, so no subword "
            "tokenizer is needed"
        ),
        compilable=False,  # its forward walks the source vocabulary's trie on the host every step
        batch_keys=("patch_end", "context", "probe_blocks", "boundary_only"),
        complete_config="bytelm.distill.byteify:fill_source_fields",
        load_pretrained="bytelm.distill.byteify:load_pretrained",
        param_groups="bytelm.distill.byteify:param_groups",
        objective="bytelm.distill.byteify:attach_byteify",
        card_generation=" (patch boundaries decided online, the backbone run once per patch)",
        card_sections=(_BYTEIFIED_SCORING,),
    ),
)
ARCHS: tuple[str, ...] = tuple(s.arch for s in BUILTIN_SPECS)  # the built-in kinds

for _spec in BUILTIN_SPECS:
    _SPECS[_spec.arch] = _spec
