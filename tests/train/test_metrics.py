"""Loss / metric formulas against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from bytelm.data.packed import IGNORE
from bytelm.lit.metrics import bits_per_byte, byte_nll_sum, z_loss
from bytelm.lit.schedule import lr_multiplier


def test_bpb_hand_computed():
    # two byte targets with probabilities 1/2 and 1/4 -> 1 bit + 2 bits = 1.5 bits per byte
    logits = torch.full((1, 3, 320), -1e9)
    logits[0, 0, 65] = math.log(0.5)
    logits[0, 0, 66] = math.log(0.5)
    logits[0, 1, 10:14] = math.log(0.25)
    logits[0, 2, 0] = 0.0
    targets = torch.tensor([[65, 12, IGNORE]])
    s, n = byte_nll_sum(logits, targets)
    assert int(n) == 2
    assert bits_per_byte(s, n) == pytest.approx(1.5, abs=1e-5)


def test_bpb_uniform_is_eight_bits():
    logits = torch.zeros(2, 5, 256)
    targets = torch.randint(0, 256, (2, 5))
    s, n = byte_nll_sum(logits, targets)
    assert bits_per_byte(s, n) == pytest.approx(8.0, abs=1e-4)


def test_special_targets_excluded_from_bpb():
    logits = torch.zeros(1, 2, 320)
    s, n = byte_nll_sum(logits, torch.tensor([[258, 3]]))  # EOS is trained on, not counted as a byte
    assert int(n) == 1 and float(s) == pytest.approx(math.log(320), abs=1e-4)


def test_z_loss_hand_computed():
    logits = torch.zeros(1, 2, 4)  # logsumexp = log 4
    targets = torch.tensor([[1, IGNORE]])
    assert float(z_loss(logits, targets)) == pytest.approx(math.log(4) ** 2, abs=1e-5)


def test_schedules():
    kw = dict(warmup=10, total=110, min_ratio=0.1, decay_fraction=0.2)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert lr_multiplier(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(80, schedule="wsd", **kw) == 1.0  # stable until the last 22 steps
    assert lr_multiplier(110, schedule="wsd", **kw) == pytest.approx(0.1)
    assert lr_multiplier(99, schedule="wsd", **kw) == pytest.approx(1 - 0.9 * (99 - 88) / 22)
    with pytest.raises(ValueError, match="cosinus"):
        lr_multiplier(50, schedule="cosinus", **kw)
