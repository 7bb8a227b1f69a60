"""One definition each: the special byte ids live in bytelm.data.bytes, the HF config's fields come from
ModelConfig, and the HF model builds through bytelm.models.build_model."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from bytelm.data import bytes as byte_ids
from bytelm.hf.configuration_bytelm import BytelmConfig
from bytelm.models.config import GateConfig, ModelConfig, RopeScalingConfig

PKG = Path(__file__).resolve().parents[2] / "bytelm"
NAMES = {"PAD_ID", "BOS_ID", "EOS_ID", "VOCAB_SIZE", "PADDED_VOCAB", "_PAD", "_BOS", "_EOS"}


def test_special_ids_are_assigned_only_in_data_bytes():
    offenders = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for t in (
                targets
            ):  # names bound by the assignment (a = ..., a, b = ...), not names used in a subscript
                for n in t.elts if isinstance(t, ast.Tuple) else [t]:
                    if isinstance(n, ast.Name) and n.id in NAMES and f != PKG / "data" / "bytes.py":
                        offenders.append(f"{f.relative_to(PKG)}:{node.lineno} {n.id}")
    assert not offenders, offenders
    assert (byte_ids.PAD_ID, byte_ids.BOS_ID, byte_ids.EOS_ID) == (256, 257, 258)


def test_hf_config_has_every_model_field_with_its_default():
    hf = BytelmConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("gate", "rope_scaling"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert getattr(hf, f.name) == default, f.name
    assert hf.gate == dataclasses.asdict(GateConfig())
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (
        byte_ids.PAD_ID,
        byte_ids.BOS_ID,
        byte_ids.EOS_ID,
    )


def test_hf_config_round_trips_a_non_default_model_config():
    cfg = ModelConfig(
        arch="hierarchical",
        d_model=96,
        n_layers=3,
        pooling="last",
        decoder_cross="all",
        chunker="gate",
        n_kv_heads=2,
        qkv_bias=True,
        norm_eps=1e-5,
        gate=GateConfig(k=-20.0, target_ratio=0.7),
        rope_scaling=RopeScalingConfig(kind="linear", factor=2.0),
        boundary_threshold=-0.5,
    )
    hf = BytelmConfig.from_model_config(cfg)
    assert hf.to_model_config() == cfg
    again = BytelmConfig.from_dict(hf.to_dict())
    assert again.to_model_config() == cfg


def test_hf_modeling_builds_through_build_model():
    text = (PKG / "hf" / "modeling_bytelm.py").read_text()
    assert "build_model(" in text
    for cls in ("FlatByteLM(", "HierarchicalByteLM(", "MrT5(", "ByteifiedLM("):
        assert cls not in text, cls
