"""bytelm.models.decode_layout: tall weights stored transposed change storage only (values, shapes, names,
outputs, gradients, generation), for every model kind and the byteified model's tied source head."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from bytelm.models.build import build_model
from bytelm.models.decode_layout import decode_layout, prefer_kmajor
from bytelm.models.generate import generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "byteify"))
from test_byteify_model import HAND, randomise_residual, small_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def models():
    out = []
    for kind in ("flat", "hierarchical"):
        torch.manual_seed(0)
        out.append((kind, build_model(tiny_config(kind)).eval()))
    for tied in (False, True):
        m = small_model(HAND, tied=tied)
        randomise_residual(m, 2)
        out.append((f"byteified tied={tied}", m))
    return out


def tall(m: nn.Module) -> set[int]:
    return {
        id(x.weight)
        for x in m.modules()
        if isinstance(x, nn.Linear) and x.out_features > x.in_features and x.weight.numel() >= 16
    }


@pytest.mark.parametrize("name,m", models(), ids=lambda v: v if isinstance(v, str) else "")
def test_layout_changes_storage_only(name, m):
    ref = copy.deepcopy(m)
    x = torch.tensor([list(b"abc ab ca \xc3\xa9t\xc3\xa9 ab")])
    n = prefer_kmajor(m, min_numel=16, extra=[m.head_weight()] if hasattr(m, "head_weight") else [])
    want = tall(ref) if not hasattr(m, "head_weight") else None
    if want is not None:
        assert n == len(want) > 0
    for (k, a), (k2, b) in zip(m.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2 and a.shape == b.shape and torch.equal(a, b), k
    for mod in m.modules():  # every tall weight is K-major now
        if isinstance(mod, nn.Linear) and mod.out_features > mod.in_features:
            assert mod.weight.stride() == (1, mod.out_features), name
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    # training still works and gives the same gradients
    for model in (m, ref):
        model.train()
        model.zero_grad()
        model(x).logits.float().pow(2).mean().backward()
        model.eval()
    for (k, a), (_, b) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_byteified_generation_and_tied_head_with_the_decode_layout():
    m = small_model(HAND, tied=True)
    randomise_residual(m, 2)
    ref = copy.deepcopy(m)
    assert decode_layout(m) >= 1
    head = m.head_weight()
    assert head.stride() == (1, head.shape[0])  # the tied source head (an embedding table) too
    assert decode_layout(m) == 0  # idempotent
    for prompt in (b"abc ab", b"ca"):
        assert generate(m, prompt, 30, temperature=0) == generate(ref, prompt, 30, temperature=0)
