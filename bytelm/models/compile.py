"""``torch.compile`` of a bytelm model's training forward (``trainer.compile=true``; bytelm.lit.module calls
it).

What makes the forwards compile whole (``torch._dynamo.explain`` finds no graph break;
tests/models/test_compile.py):
- no host work in the training forward: word starts come from the data layer (``batch["word_start"]``; the
  splitter runs only when they are missing and is excluded from compilation), the learned chunker's size cap
  is vectorised, attention metadata on the CPU/SDPA path is tensor ops;
- the one data-dependent shape, the hierarchical model's word count ``W``, is captured as an unbacked size
  (``capture_scalar_outputs``) instead of a graph break, so the backbone runs inside the same graph and
  batches with another ``W`` reuse it.
The flash path's ``cu_seqlens`` (one host sync, ``attention.varlen_info``) is a graph break per stack where it
runs (CUDA); the flex path's block mask is built by a compiled ``create_block_mask`` inside the graph.

``byteified`` is not compiled: its forward walks the source vocabulary's trie on the host (expanded ids, patch
tokens, prior nodes) in every step; it trains eagerly with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bytelm.models.registry import get_spec

log = logging.getLogger(__name__)


class CompiledForward:
    """``torch.compile(model)`` called with the dynamo settings bytelm's models need. A plain object (not an
    ``nn.Module``), so holding it adds nothing to any ``state_dict``; the compiled module shares ``model``'s
    parameters."""

    def __init__(
        self,
        model: nn.Module,
        backend: str | Callable[..., Any] = "inductor",
        fullgraph: bool = False,
        dynamic: bool | None = None,
    ) -> None:
        self.model = model
        self.fn = torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(
            capture_scalar_outputs=True
        ):  # W: an unbacked size, not a graph break
            return self.fn(*args, **kwargs)


def compile_forward(
    model: nn.Module, arch: str, backend: str | Callable[..., Any] = "inductor", fullgraph: bool = False
) -> CompiledForward | None:
    """The compiled training forward of ``model`` (``cfg.model.arch`` = ``arch``), or None (with a warning)
    for architectures that are not compiled (module docstring)."""
    if not get_spec(arch).compilable:
        log.warning(
            "trainer.compile: model.arch=%s is not compiled (its forward does host work every step, "
            "ModelSpec.compilable=False); training eagerly",
            arch,
        )
        return None
    log.info("trainer.compile: compiling the %s training forward (backend %s)", arch, backend)
    return CompiledForward(model, backend=backend, fullgraph=fullgraph)


def graph_breaks(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, list[str]]:
    """``torch._dynamo.explain`` of ``fn(*args, **kwargs)`` under the settings of :class:`CompiledForward`:
    (number of graph breaks, their reasons)."""
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        e = torch._dynamo.explain(fn)(*args, **kwargs)
    return e.graph_break_count, [str(b.reason).split("\n")[0] for b in e.break_reasons]
