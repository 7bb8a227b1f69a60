"""``torch.compile`` of every model kind's training forward on CPU: compiled losses and gradients equal eager
(1e-4) with ``fullgraph=True`` (no graph break), and ``trainer.compile=true`` trains through ``bytelm.train``.

Inductor on CPU compiles a tiny model in about a minute (C++ code generation), too slow for the default suite:
it checks ``aot_eager`` (dynamo's graph capture + AOT autograd's forward/backward graphs, which is where the
semantics can change: see ``PIController.current_alpha``) and runs inductor in the slow tests. Two steps each,
so the gate's controller state moves between them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KINDS, tiny_model

from bytelm.models.compile import CompiledForward, compile_forward, graph_breaks
from bytelm.models.hierarchical import split_word_starts

pytestmark = pytest.mark.usefixtures("one_thread")

T = 40
SMALL = dict(
    n_layers=1, d_byte=16, encoder_layers=1, max_word_bytes=8, gate={"layer": 0}
)  # on conftest's TINY
KINDS = list(TINY_KINDS)


def _model(kind: str) -> torch.nn.Module:
    return tiny_model(kind, **SMALL)


def _batch() -> dict[str, torch.Tensor]:
    text = b"the quick brown fox jumps over a lazy dog; " * 3
    ids = torch.stack([torch.tensor(list(text[i * 7 : i * 7 + T + 1])) for i in range(2)])
    docs = torch.stack(
        [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in ([13, 20, 7], [25, 15])]
    )
    x = ids[:, :-1]
    ws = np.stack([split_word_starts(r.numpy(), 8, d.numpy()) for r, d in zip(x, docs, strict=True)])
    return {"input_ids": x, "targets": ids[:, 1:], "doc_ids": docs, "word_start": torch.from_numpy(ws)}


def _loss(fn, b: dict[str, torch.Tensor]) -> torch.Tensor:
    out = fn(b["input_ids"], targets=b["targets"], doc_ids=b["doc_ids"], word_start=b["word_start"])
    loss = (
        out.loss
        if out.loss is not None
        else F.cross_entropy(out.logits.float().flatten(0, 1), b["targets"].flatten())
    )
    return loss + out.aux_loss if out.aux_loss is not None else loss


def _check_compiled_equals_eager(kind: str, backend: str, steps: int = 2) -> None:
    """``steps`` training forwards + backwards (the gate's controller state moves between them)."""
    eager = _model(kind)
    comp = copy.deepcopy(eager)
    fn = CompiledForward(comp, backend=backend, fullgraph=True)  # fullgraph: a graph break is an error
    b = _batch()
    for _ in range(steps):
        le, lc = _loss(eager, b), _loss(fn, b)
        torch.testing.assert_close(lc, le, atol=1e-4, rtol=1e-4)
        le.backward()
        lc.backward()
        for (name, p), q in zip(eager.named_parameters(), comp.parameters(), strict=True):
            if p.grad is not None:
                torch.testing.assert_close(
                    q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
                )
                p.grad = q.grad = None


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_forward_equals_eager(kind: str) -> None:
    _check_compiled_equals_eager(kind, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_inductor_training_forward_equals_eager(kind: str) -> None:
    _check_compiled_equals_eager(kind, "inductor", steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_no_graph_breaks(kind: str) -> None:
    b = _batch()
    n, reasons = graph_breaks(
        _model(kind), b["input_ids"], targets=b["targets"], doc_ids=b["doc_ids"], word_start=b["word_start"]
    )
    assert n == 0, reasons


def test_byteified_is_not_compiled(caplog) -> None:
    assert compile_forward(torch.nn.Linear(2, 2), "byteified") is None
    assert "not compiled" in caplog.text


def _train(tmp_path, tiny_overrides, experiment: str, backend: str) -> dict:
    from bytelm.config import load_config
    from bytelm.train import run

    cfg = load_config(
        [
            f"experiment={experiment}",
            *tiny_overrides,
            "trainer.max_steps=3",
            "trainer.val_every=3",
            "trainer.ckpt_every=3",
            "trainer.compile=true",
            f"trainer.compile_backend={backend}",
            "model.n_layers=1",
            "data.seq_len=32",
            "data.batch_size=2",
        ]
    )
    res = run(cfg)
    assert res["global_step"] == 3
    assert res["module"]._compiled  # steps 2 and 3 ran compiled
    return res


def test_train_with_compile(tmp_path, tiny_overrides) -> None:
    res = _train(tmp_path, tiny_overrides, "flat_tiny", "aot_eager")
    assert 0 < res["metrics"]["val/bpb"] < 10
    assert not any(k.startswith("_compiled") or "_orig_mod" in k for k in res["module"].state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["flat_tiny", "hat_tiny", "hat_tiny_gate", "mrt5_tiny"])
def test_train_with_compile_inductor(tmp_path, tiny_overrides, experiment: str) -> None:
    _train(tmp_path, tiny_overrides, experiment, "inductor")
