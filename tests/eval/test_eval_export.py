"""``bytelm.eval`` scores an exported folder exactly as its checkpoint: packed rows with document ids, in rows
of the training length (config.json's ``train_seq_len``, or the model card's training configuration for
folders exported before that key existed), with the training run's invalid-UTF-8 handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from bytelm.config import Config, config_to_dict
from bytelm.eval.scoring import ByteScorer, load_scorer
from bytelm.hf.export import export_checkpoint
from bytelm.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 96  # the training row length: neither max_seq_len (256) nor the scorers' defaults
TEXTS = [  # several documents per row, one longer than a row, multilingual, invalid UTF-8
    b"To be, or not to be, that is the question.",
    "Привет, мир! 中文字 ぁ。 caf\u00e9 \u00a0x".encode(),
    b"Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, " * 2,
    b"bad \xe3\x80 bytes \xff and the end",
    b"short",
]


def write_ckpt(path: Path, arch: str) -> Path:
    """A Lightning-format bytelm checkpoint with random weights, trained (nominally) on rows of SEQ_LEN."""
    torch.manual_seed(0)
    model_cfg = tiny_config(arch, encoder_layers=1, max_seq_len=256, max_word_bytes=8, init_std=0.1)
    cfg = Config(name=f"tiny-{arch}", model=model_cfg)
    cfg.data.seq_len = SEQ_LEN
    model = build_model(cfg.model)
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
            "bytelm_config": config_to_dict(cfg),
            "global_step": 1,
            "epoch": 0,
        },
        path,
    )
    return path


class DropDocIds(nn.Module):
    """The model without document ids: packed rows then attend across documents."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids, doc_ids=None, **kw):
        return self.inner(ids, **kw)


@pytest.mark.parametrize("arch", ["flat", "hierarchical"])
def test_exported_folder_bpb_equals_checkpoint_bpb(arch: str, tmp_path: Path) -> None:
    ckpt = write_ckpt(tmp_path / "m.ckpt", arch)
    folder = export_checkpoint(ckpt, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["train_seq_len"] == SEQ_LEN
    native, exported = load_scorer(ckpt), load_scorer(folder)
    assert exported.describe()["seq_len"] == native.describe()["seq_len"] == SEQ_LEN
    assert exported.describe()["source"] == "hf-export" and exported.kind == arch
    a, b = native.corpus_nll(TEXTS), exported.corpus_nll(TEXTS)
    assert b.n_bytes == a.n_bytes > 2 * SEQ_LEN
    assert b.bpb == pytest.approx(a.bpb, rel=1e-6, abs=1e-6)
    # the comparison can see a missing document mask or another row length
    assert isinstance(exported, ByteScorer)
    leaky = ByteScorer(
        DropDocIds(exported.model),
        arch=arch,
        seq_len=SEQ_LEN,
        words=exported.words,
        max_word_bytes=exported.max_word_bytes,
    )
    assert abs(leaky.corpus_nll(TEXTS).bpb - a.bpb) > 1e-3
    other = load_scorer(folder, seq_len=256)
    assert abs(other.corpus_nll(TEXTS).bpb - a.bpb) > 1e-3


def test_older_folders_fall_back_to_the_model_card(tmp_path: Path) -> None:
    """A folder whose config.json predates ``train_seq_len`` takes the row length from its model card; without
    a card, from ``max_seq_len``."""
    folder = export_checkpoint(write_ckpt(tmp_path / "m.ckpt", "flat"), tmp_path / "hf")
    conf = json.loads((folder / "config.json").read_text())
    for key in ("train_seq_len", "train_invalid_utf8"):
        conf.pop(key)
    (folder / "config.json").write_text(json.dumps(conf))
    assert load_scorer(folder).describe()["seq_len"] == SEQ_LEN
    (folder / "README.md").unlink()
    assert load_scorer(folder).describe()["seq_len"] == 256
