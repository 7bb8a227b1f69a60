"""Transplant the decoder blocks of a Llama-family Hugging Face causal LM into bytelm's backbone, exactly.

docs/byteify.md: a byteified student's backbone *is* the source model's blocks. They are **mapped, not
wrapped**: the weights are copied into bytelm's own pure-torch ``Block`` s (``bytelm/models/layers.py``), so
the student stays one plain torch module that every part of bytelm already handles (attention backends and
packed documents, activation checkpointing, ZeRO / FSDP2 sharding, KV-cached generation, the HF export with
its own modelling code), with no transformers import in ``bytelm/models`` and no second cache or mask
convention. The cost is this file: a name map and the few Llama-family details the blocks had to learn
(grouped-query attention, head width, MLP width, norm eps, q/k/v biases, linear / llama3 RoPE scaling, a
sliding window), each tested against the source model's own hidden states (tests/byteify/test_transplant.py).

Supported: ``model_type`` llama (SmolLM2 is one), mistral and qwen2 with ``silu`` MLPs and the RoPE types
default, linear and llama3. Anything the blocks cannot reproduce exactly is an error naming the value.
Sliding windows: Mistral's ``sliding_window`` (every layer) becomes ``backbone_window`` (bytelm's attention
masks keys with ``q - k >= window``, the rule of HF's mask), so it is reproduced, not refused; Qwen2 with
``use_sliding_window`` on only some layers (``max_window_layers``) is an error, since the backbone has one
window.

    cfg = ModelConfig(arch="hierarchical", **source_fields(hf_model.config), d_byte=..., ...)
    model = HierarchicalByteLM(cfg); model.init_weights(); transplant_backbone(model, hf_model)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bytelm.data.cache import cache_dir
from bytelm.models.config import RopeScalingConfig
from bytelm.models.hierarchical import HierarchicalByteLM
from bytelm.models.layers import swiglu_hidden

__all__ = ["backbone_state_dict", "load_source", "source_embeddings", "source_fields", "transplant_backbone"]

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def _rope(hf_config: Any) -> tuple[float, dict[str, Any]]:
    """(rope_theta, RopeScalingConfig fields) from ``rope_parameters`` (transformers >= 5) or the older
    ``rope_theta`` + ``rope_scaling`` attributes."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    else:
        params = dict(params)
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type RoPE parameters are not supported: rope_parameters={params}")
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0))
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (bytelm rotates the whole head)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, asdict(RopeScalingConfig())
    if kind == "linear":
        return theta, asdict(RopeScalingConfig(kind="linear", factor=float(params["factor"])))
    if kind == "llama3":
        orig = params.get("original_max_position_embeddings") or hf_config.max_position_embeddings
        return theta, asdict(
            RopeScalingConfig(
                kind="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position=int(orig),
            )
        )
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


def _window(hf_config: Any) -> int:
    """The sliding window the source model's attention really applies (0 = none)."""
    model_type = hf_config.model_type
    if model_type == "mistral":
        return int(hf_config.sliding_window or 0)
    if model_type == "qwen2":
        layer_types = list(getattr(hf_config, "layer_types", None) or [])
        sliding = [t == "sliding_attention" for t in layer_types]
        if not getattr(hf_config, "use_sliding_window", False) or not any(sliding):
            return 0
        if not all(sliding):
            raise ValueError(
                f"qwen2 use_sliding_window=True with sliding_window={hf_config.sliding_window} on only some "
                f"layers (max_window_layers={getattr(hf_config, 'max_window_layers', None)}): the backbone "
                "has one window for all its blocks"
            )
        return int(hf_config.sliding_window)
    return 0


def source_fields(hf_config: Any) -> dict[str, Any]:
    """The ``ModelConfig`` fields of a backbone that reproduces the source model's decoder blocks exactly:
    d_model, n_layers, n_heads, n_kv_heads, head_dim, mlp_hidden, norm_eps, rope_theta, rope_scaling (a dict
    for ``RopeScalingConfig``), qkv_bias, backbone_window. Independent of ``max_seq_len``. Raises
    ``ValueError`` naming the value for anything it cannot reproduce."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} (bytelm's SwiGLU uses silu)")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported (bytelm's SwiGLU has no biases)")
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and no o_proj bias
    else:
        if getattr(hf_config, "attention_bias", False):
            # Llama's attention_bias also puts a bias on o_proj, which bytelm's blocks do not have
            raise ValueError(f"{model_type} attention_bias=True (q/k/v *and* o_proj biases) is not supported")
        qkv_bias = False
    if int(getattr(hf_config, "pretraining_tp", 1) or 1) != 1:
        raise ValueError(f"pretraining_tp={hf_config.pretraining_tp} is not supported")
    theta, scaling = _rope(hf_config)
    n_heads = int(hf_config.num_attention_heads)
    d_model = int(hf_config.hidden_size)
    head_dim = int(getattr(hf_config, "head_dim", None) or d_model // n_heads)
    return {
        "d_model": d_model,
        "n_layers": int(hf_config.num_hidden_layers),
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(hf_config, "num_key_value_heads", None) or n_heads),
        "head_dim": head_dim,
        "mlp_hidden": int(hf_config.intermediate_size),
        "norm_eps": float(hf_config.rms_norm_eps),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "qkv_bias": qkv_bias,
        "backbone_window": _window(hf_config),
    }


def load_source(path_or_gguf: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """(hf_model in fp32 eval mode on CPU, tokenizer) from a local HF folder or ``.gguf`` file; ``None`` = the
    offline SmolLM2-135M GGUF (``bytelm.distill.teacher.smollm2_gguf_path``). Never touches a hub.

    transformers dequantizes a GGUF to fp32 on load, which takes ~10-40 s (mostly parsing the GGUF metadata,
    not the weights); the result is saved once as an fp32 safetensors folder under
    ``cache_dir()/gguf_fp32/<stem>-<size>`` and reloaded from there (about a second; same tensors bit for
    bit).
    """
    from transformers import AutoModelForCausalLM

    from bytelm.distill.teacher import load_teacher, load_tokenizer, smollm2_gguf_path

    path = smollm2_gguf_path() if path_or_gguf is None else Path(path_or_gguf)
    if path.suffix != ".gguf":
        teacher = load_teacher(path, device="cpu", dtype=torch.float32)
        return teacher.model.eval(), teacher.tokenizer
    cached = cache_dir() / "gguf_fp32" / f"{path.stem}-{path.stat().st_size}"
    if (cached / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32, local_files_only=True)
        return model.eval(), load_tokenizer(path)
    teacher = load_teacher(path, device="cpu", dtype=torch.float32)
    model = teacher.model.eval()
    _save_dequantized(model, cached)
    return model, teacher.tokenizer


def _save_dequantized(model: Any, target: Path) -> None:
    """Save a GGUF-loaded model as a plain fp32 HF folder, atomically (docs/design.md#platform-notes: drop the
    quantizer first)."""
    import copy

    plain = copy.copy(model)  # shallow: shares the tensors; only the attributes below differ
    plain.hf_quantizer = None
    plain.config = copy.deepcopy(model.config)
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        plain.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:  # another process won the race (its copy is as good), or the disk is full: load anyway
        log.warning("could not cache the dequantized GGUF under %s", target)
        shutil.rmtree(tmp, ignore_errors=True)


def _decoder(hf_model: Any) -> Any:
    """The decoder stack (``.layers``, ``.norm``) of a *ForCausalLM or of the bare model."""
    base = getattr(hf_model, "model", hf_model)
    if not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ValueError(
            f"{type(hf_model).__name__} has no decoder layers/norm where a Llama-family model has them"
        )
    return base


def _no_bias(lin: nn.Linear, name: str) -> torch.Tensor:
    if getattr(lin, "bias", None) is not None:
        raise ValueError(f"{name} has a bias, which bytelm's blocks do not have")
    return lin.weight.detach()


def backbone_state_dict(hf_model: Any) -> dict[str, torch.Tensor]:
    """The source model's decoder weights under bytelm's names: ``backbone.{i}.attn_norm.weight``,
    ``backbone.{i}.attn.wqkv.weight`` (q_proj, k_proj, v_proj stacked by rows), ``.attn.wqkv.bias`` (when the
    source has q/k/v biases), ``.attn.wo.weight``, ``.mlp_norm.weight``, ``.mlp.w_gate/w_up/w_down.weight``,
    and ``backbone_norm.weight``."""
    base = _decoder(hf_model)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(base.layers):
        p, a, m = f"backbone.{i}.", layer.self_attn, layer.mlp
        out[p + "attn_norm.weight"] = layer.input_layernorm.weight.detach()
        out[p + "attn.wqkv.weight"] = torch.cat(
            [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0
        ).detach()
        biases = [getattr(a, n).bias for n in ("q_proj", "k_proj", "v_proj")]
        if any(b is not None for b in biases):
            if any(b is None for b in biases):
                raise ValueError(f"layer {i}: only some of q_proj/k_proj/v_proj have a bias")
            out[p + "attn.wqkv.bias"] = torch.cat(biases, 0).detach()
        out[p + "attn.wo.weight"] = _no_bias(a.o_proj, f"layer {i} o_proj")
        out[p + "mlp_norm.weight"] = layer.post_attention_layernorm.weight.detach()
        out[p + "mlp.w_gate.weight"] = _no_bias(m.gate_proj, f"layer {i} gate_proj")
        out[p + "mlp.w_up.weight"] = _no_bias(m.up_proj, f"layer {i} up_proj")
        out[p + "mlp.w_down.weight"] = _no_bias(m.down_proj, f"layer {i} down_proj")
    out["backbone_norm.weight"] = base.norm.weight.detach()
    return out


def transplant_backbone(model: HierarchicalByteLM, hf_model: Any) -> None:
    """Copy the source model's decoder blocks into ``model.backbone`` / ``model.backbone_norm`` of a
    ``HierarchicalByteLM`` built with ``source_fields(hf_model.config)``. All or nothing: a config field that
    differs from the source (RoPE, eps, window, ...), a missing or extra parameter, or a shape mismatch is a
    ``ValueError`` naming it, raised before anything is copied."""
    want = source_fields(hf_model.config)
    cfg = model.cfg
    for key, val in want.items():
        have = getattr(cfg, key)
        have = asdict(have) if key == "rope_scaling" else have
        if key in ("n_kv_heads", "head_dim", "mlp_hidden") and not have:  # 0 = bytelm's default
            have = {
                "n_kv_heads": cfg.n_heads,
                "head_dim": cfg.d_model // cfg.n_heads,
                "mlp_hidden": swiglu_hidden(cfg.d_model, cfg.mlp_ratio),
            }[key]
        if have != val:
            raise ValueError(
                f"model.{key}={have!r} but the source model needs {val!r} (build it with source_fields)"
            )
    src = backbone_state_dict(hf_model)
    dst = {k: v for k, v in model.named_parameters() if k.startswith(("backbone.", "backbone_norm."))}
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or extra:
        raise ValueError(f"backbone parameters differ: not in the source {missing}, not in the model {extra}")
    for k, t in src.items():
        if tuple(dst[k].shape) != tuple(t.shape):
            raise ValueError(f"{k}: model shape {tuple(dst[k].shape)} != source shape {tuple(t.shape)}")
    with torch.no_grad():
        for k, t in src.items():
            dst[k].copy_(t)


def source_embeddings(hf_model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input embedding matrix (V, D), output head (V, D) or None when tied to the embeddings)."""
    emb = hf_model.get_input_embeddings().weight.detach()
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if head is None:
        return emb, None
    w = head.weight.detach()
    if w.data_ptr() == emb.data_ptr() or getattr(hf_model.config, "tie_word_embeddings", False):
        return emb, None
    return emb, w
