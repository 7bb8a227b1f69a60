"""Hugging Face export of bytelm models: config, modelling code, byte tokenizer, export + reload.

- ``configuration_bytelm.BytelmConfig``: ``PretrainedConfig`` with every ``ModelConfig`` field;
- ``modeling_bytelm.BytelmForCausalLM`` (flat, hierarchical) / ``BytelmForSeq2SeqLM`` (MrT5);
- ``tokenization_bytelm.ByteTokenizer`` (ids 0-255 = bytes; PAD/BOS/EOS = 256/257/258);
- ``export.export_checkpoint(ckpt, out)`` / ``export.generate_from_folder(out, prompt)``.

Names are imported lazily so ``import bytelm.hf`` stays cheap.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "BytelmConfig": "bytelm.hf.configuration_bytelm",
    "BytelmForCausalLM": "bytelm.hf.modeling_bytelm",
    "BytelmForSeq2SeqLM": "bytelm.hf.modeling_bytelm",
    "ByteTokenizer": "bytelm.hf.tokenization_bytelm",
    "ExportError": "bytelm.hf.export",
    "export_checkpoint": "bytelm.hf.export",
    "export_model": "bytelm.hf.export",
    "generate_from_folder": "bytelm.hf.export",
    "push_folder": "bytelm.hf.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bytelm.hf' has no attribute {name!r}")
