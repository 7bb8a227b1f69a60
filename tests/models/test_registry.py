"""The model registry (bytelm.models.registry): every kind is one ModelSpec; a kind registered from a test
(the bigram toy of tests/models/toy_kind.py, no bytelm file touched) trains with the real entry point, is
evaluated by bytelm.eval, exported with bytelm.hf.export and reloaded through transformers with the same
logits."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from toy_kind import BigramByteLM

from bytelm.config import load_config
from bytelm.models import ARCHS, build_model
from bytelm.models.config import ModelConfig
from bytelm.models.registry import (
    ModelSpec,
    find_spec,
    get_spec,
    register_model,
    registered_archs,
    resolve,
    unregister_model,
)

ROOT = Path(__file__).resolve().parents[2]
TOY = ModelSpec(
    arch="bigram",
    model=BigramByteLM,
    description="a bigram byte LM (a test's toy kind)",
    batched_cache=True,
    compilable=False,
)


@pytest.fixture
def toy_kind():
    register_model(TOY)
    yield TOY
    unregister_model(TOY.arch)


def test_builtin_kinds_are_registered_on_import():
    assert registered_archs()[: len(ARCHS)] == ARCHS == ("flat", "hierarchical", "mrt5", "byteified")
    for arch in ARCHS:
        spec = get_spec(arch)
        assert spec.builtin and spec.arch == arch and isinstance(spec.model_class(), type)
    assert get_spec("mrt5").seq2seq and get_spec("mrt5").auto_class == "AutoModelForSeq2SeqLM"
    assert get_spec("hierarchical").needs_words(ModelConfig(arch="hierarchical"))
    assert not get_spec("hierarchical").needs_words(ModelConfig(arch="hierarchical", chunker="gate"))
    assert not get_spec("byteified").compilable and get_spec("byteified").batch_keys


def test_every_string_reference_resolves():
    for arch in ARCHS:
        spec = get_spec(arch)
        for f in dataclasses.fields(spec):
            v = getattr(spec, f.name)
            if isinstance(v, str) and ":" in v and f.name not in ("description",) and "\n" not in v:
                assert callable(resolve(v)), (arch, f.name, v)


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model.arch 'nope'.*flat, hierarchical, mrt5, byteified"):
        get_spec("nope")
    with pytest.raises(ValueError, match="unknown model.arch 'nope'"):
        build_model(ModelConfig(arch="nope"))
    with pytest.raises(ValueError, match="already registered"):
        register_model(dataclasses.replace(get_spec("flat")))
    with pytest.raises(ValueError, match="built-in"):
        unregister_model("flat")
    with pytest.raises(ValueError, match="plain name"):
        ModelSpec(arch="a-b", model=BigramByteLM)


def test_no_arch_branch_outside_the_registry():
    """The point of the registry: no module of bytelm compares ``arch`` with a kind's name."""
    pattern = re.compile(r"""\barch\s*(==|!=|\bin\b|\bnot in\b)\s*[("']|["']\s*(==|!=)\s*\w*\.?arch\b""")
    hits = []
    for path in sorted((ROOT / "bytelm").rglob("*.py")):
        if path.name == "registry.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and '"""' not in code and "``" not in code:
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_config_accepts_a_kind_only_while_registered(toy_kind):
    assert load_config(["model.arch=bigram"]).model.arch == "bigram"
    unregister_model("bigram")
    try:
        with pytest.raises(ValueError, match="bigram"):
            load_config(["model.arch=bigram"])
    finally:
        register_model(TOY)


def test_toy_kind_trains_evaluates_exports_and_reloads(toy_kind, tmp_path, tiny_overrides):
    from transformers import AutoModelForCausalLM

    from bytelm.eval.scoring import load_scorer
    from bytelm.hf.export import export_checkpoint
    from bytelm.train import run

    cfg = load_config(
        [
            "experiment=flat_tiny",
            *tiny_overrides,
            "model.arch=bigram",
            "model.d_model=16",
            "trainer.max_steps=6",
            "trainer.val_every=3",
            "trainer.ckpt_every=3",
            "trainer.compile=true",  # not compilable: trains eagerly with a warning
        ]
    )
    res = run(cfg)
    assert res["global_step"] == 6
    assert 0 < res["metrics"]["val/bpb"] < 9
    assert isinstance(res["module"].model, BigramByteLM)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"

    texts = [b"To be, or not to be, that is the question.", "caf\u00e9 \u4e2d\u6587".encode()]
    scorer = load_scorer(ckpt, seq_len=32)
    bpb = scorer.corpus_nll(texts).bpb
    assert math.isfinite(bpb) and bpb > 0

    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert (out / "toy_kind.py").is_file()
    assert "register_model(ModelSpec(arch='bigram'" in (out / "registry.py").read_text()
    assert "a bigram byte LM" in (out / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    # the folder's own copy of the class
    assert type(hf.model).__name__ == "BigramByteLM" and type(hf.model) is not BigramByteLM
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        live = res["module"].model.eval()(x).logits
        got = hf(x).logits
    torch.testing.assert_close(got, live[..., : got.shape[-1]])
    gen = hf.generate(torch.tensor([[257, *b"To be"]]), max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 11)
    exported = load_scorer(out, seq_len=32)
    assert exported.corpus_nll(texts).bpb == pytest.approx(bpb, rel=1e-5)
    assert find_spec("bigram") is TOY


def test_cli_accepts_a_kind_registered_after_importing_train(tmp_path):
    """A script that registers a kind and calls ``bytelm.train.main()`` composes ``model.arch=bigram`` (the
    schema Hydra validates against is rebuilt after registration): docs/extending.md."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, bytelm.train\n"
        "from bytelm.models.registry import ModelSpec, register_model\n"
        "from toy_kind import BigramByteLM\n"
        "register_model(ModelSpec(arch='bigram', model=BigramByteLM))\n"
        "sys.argv = ['bytelm-train', 'experiment=flat_tiny', 'model.arch=bigram', '--cfg', 'job']\n"
        "bytelm.train.main()\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "models")]),
        OMP_NUM_THREADS="1",
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "arch: bigram" in res.stdout
