"""Hugging Face export of byteified models (``model.arch=byteified``): the folder carries the source
vocabulary buffers and frozen source embeddings, reloads with bytelm's logits (also in a fresh interpreter
where bytelm cannot be imported), and ``generate()`` with bytelm's ``ByteifiedCache`` equals greedy by full
forwards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from bytelm.config import config_to_dict, load_config
from bytelm.data.bytes import BOS_ID, EOS_ID
from bytelm.hf.configuration_bytelm import BytelmConfig
from bytelm.hf.export import export_checkpoint, export_model
from bytelm.models import build_model
from bytelm.models.config import ModelConfig, RopeScalingConfig
from bytelm.models.generate import generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = b"To be, or not"


def _perturb(model: torch.nn.Module) -> None:
    """Move the trainable parts off their init, so the export is checked on non-trivial weights: boundary
    logits of magnitude ~1 (about half the bytes close a patch, none sits near the threshold),
    prior_scale != 1."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        last = (
            model.boundary.mlp[-1]
            if isinstance(model.boundary.mlp, torch.nn.Sequential)
            else model.boundary.mlp
        )
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 3 / last.weight.shape[1] ** 0.5)
        last.bias.fill_(0.0)
        model.prior_scale.fill_(0.7)
        model.pool.proj.bias.add_(0.01 * torch.randn(model.pool.proj.bias.shape, generator=g))
        model.pool.proj.weight.add_(0.05 * torch.randn(model.pool.proj.weight.shape, generator=g))
        model.lm_head.weight.add_(0.3 * torch.randn(model.lm_head.weight.shape, generator=g))


@pytest.fixture(scope="module")
def exported(tiny_source, tmp_path_factory):
    """(bytelm model, exported folder) of a byteified model built from the tiny Llama source, written as the
    Lightning-format checkpoint training writes and exported with ``export_checkpoint``."""
    from bytelm.lit.strategies import build_model_for

    root = tmp_path_factory.mktemp("byteify_hf")
    # learned patch boundaries (chunker=gate): the model that
    # generates (the HAT-word ablation has no cached path)
    cfg = load_config(
        ["experiment=byteify_smollm2", "debug=cpu", f"byteify.source={tiny_source}", "model.chunker=gate"]
    )
    torch.manual_seed(0)
    model = build_model_for(cfg).eval()  # fills cfg.model's source fields and loads the source's tensors
    _perturb(model)
    ckpt = {
        "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
        "bytelm_config": config_to_dict(cfg),
        "global_step": 3,
        "bytelm_metrics": {"val/bpb": torch.tensor(4.5)},
    }
    torch.save(ckpt, root / "byteified.ckpt")
    return model, export_checkpoint(root / "byteified.ckpt", root / "out")


@pytest.fixture(scope="module")
def hf(exported):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(exported[1], trust_remote_code=True).eval()


def test_folder_carries_the_source_vocabulary(exported):
    from safetensors import safe_open

    model, folder = exported
    cfg = json.loads((folder / "config.json").read_text())
    assert (
        cfg["arch"] == "byteified"
        and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_bytelm.BytelmForCausalLM"
    )
    for k in (
        "source_vocab",
        "source_vocab_bytes",
        "source_start_id",
        "source_tied",
        "lm_prior",
        "boundary_hidden",
        "n_kv_heads",
        "head_dim",
        "mlp_hidden",
        "norm_eps",
        "qkv_bias",
        "backbone_window",
    ):
        assert cfg[k] == getattr(model.cfg, k), k
    assert cfg["bytelm_rope_scaling"]["kind"] == "none"
    assert "rope_scaling" not in cfg and "rope_parameters" not in cfg  # transformers' own key stays untouched
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.vocab_bytes").dtype == torch.uint8
        assert torch.equal(f.get_tensor("model.vocab_bytes"), model.vocab_bytes)
        assert torch.equal(f.get_tensor("model.vocab_offsets"), model.vocab_offsets)
        assert torch.equal(f.get_tensor("model.source_embed.weight"), model.source_embed.weight)
    for name in ("byteified.py", "vocab_trie.py", "hierarchical.py", "chunking.py", "modeling_bytelm.py"):
        assert (folder / name).exists(), name
    for py in folder.glob("*.py"):  # self-contained: no bytelm import survives
        assert not re.search(r"^\s*(from|import)\s+bytelm\b", py.read_text(), re.M), py.name
    card = (folder / "README.md").read_text()
    assert "byteified subword LM" in card and "val/bpb | 4.5000" in card


def causal_logits(model, ids: list[int]) -> tuple[torch.Tensor, list[bool]]:
    """bytelm's own causal-bit pass: (n, V) byte logits (bit summed out) and the bits the head chose."""
    from bytelm.models.byteified import fused_marginal

    c = model.new_cache()
    with torch.no_grad():
        fused = model(torch.tensor([ids]), cache=c, causal_bits=True).logits[0]
    return fused_marginal(fused), c.bits


def test_reload_gives_checkpoint_logits(exported, hf):
    """``segment=True``: the checkpoint's fused logits and bits, rows starting with BOS and inside a document
    (the sink), specials mid-row, right padding, the joint loss. Plain forward: the causal-bit byte logits of
    bytelm's own cache, unchanged by later bytes (an honest next-byte distribution)."""
    model, _ = exported
    assert type(hf.model).__name__ == "ByteifiedLM"
    assert hf.model.source_embed.weight.requires_grad is False
    ids = torch.tensor(
        [
            [BOS_ID, *b"Hello world, this is a test"],
            [*b"no bos: 1234 \xe4\xb8\x96!", EOS_ID, BOS_ID, *b"ok then!?"],
        ]
    )
    rows = [list(b"The quick brown fox"), list(b"jumps")]
    with torch.no_grad():
        ref, got = model(ids), hf(ids, segment=True)
        assert got.logits.shape == ref.logits.shape == (*ids.shape, 2 * model.cfg.vocab_size)
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)
        assert torch.equal(got.boundary_bits, ref.hidden["closed"])
        padded = torch.zeros(2, len(rows[0]), dtype=torch.long)
        mask = torch.zeros_like(padded)
        for i, r in enumerate(rows):
            padded[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        seg = hf(input_ids=padded, attention_mask=mask, segment=True).logits
        plain = hf(input_ids=padded, attention_mask=mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(
                seg[i, : len(r)], model(torch.tensor([r])).logits[0], atol=1e-5, rtol=0
            )
            want, bits = causal_logits(model, r)
            torch.testing.assert_close(plain.logits[i, : len(r)], want, atol=1e-4, rtol=0)
            assert plain.boundary_bits[i, : len(r)].tolist() == bits
        x = torch.tensor([rows[0]])
        tgt = torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1)
        torch.testing.assert_close(hf(input_ids=x, labels=x, segment=True).loss, model(x, targets=tgt).loss)
        torch.testing.assert_close(
            hf(input_ids=x, labels=x).loss,
            F.cross_entropy(causal_logits(model, rows[0])[0][:-1], x[0, 1:]),
            atol=1e-5,
            rtol=0,
        )
        base = hf(x).logits
        for t in (3, 9, 15):
            y = x.clone()
            y[0, t] = (int(y[0, t]) + 101) % 256
            assert (hf(y).logits[0, :t] - base[0, :t]).abs().max() < 1e-5, t


def test_generate_with_cache_equals_full_forwards(exported, hf):
    model, _ = exported
    ids = torch.tensor([list(PROMPT)])
    cached = hf.generate(ids, max_new_tokens=8, do_sample=False)
    full = hf.generate(
        ids, max_new_tokens=8, do_sample=False, use_cache=False
    )  # the full forward at every step
    assert torch.equal(cached, full)
    assert bytes(t for t in cached[0, ids.shape[1] :].tolist() if t < 256) == generate(
        model, PROMPT, 8, temperature=0
    )
    prompts = [b"Now is", PROMPT]  # left-padded batch: each row generates what it generates alone (own cache)
    n = max(map(len, prompts))
    batch = torch.tensor([[256] * (n - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for row, p in zip(out, prompts, strict=True):
        assert bytes(t for t in row[n:].tolist() if t < 256) == generate(model, p, 4, temperature=0)
    kw = {"max_new_tokens": 3, "num_beams": 2, "do_sample": False}  # beam search reorders the per-row caches
    assert torch.equal(hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw))


def test_pipeline(exported):
    from transformers import pipeline

    model, folder = exported
    pipe = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    text = pipe("To be", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text == "To be" + generate(model, b"To be", 5, temperature=0).decode("utf-8", errors="replace")


def test_lm_eval_loglikelihood(exported):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, folder = exported
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=2, device="cpu")
    pairs = [("The cat sat on the", " mat"), ("", "x"), ("世界", "は")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        c, t = list(ctx.encode()) or [BOS_ID], list(cont.encode())
        logp = torch.log_softmax(causal_logits(model, c + t)[0].float(), -1)  # the honest causal-bit logits
        assert ll == pytest.approx(sum(logp[len(c) - 1 + i, b].item() for i, b in enumerate(t)), abs=1e-3)


def test_untied_source_and_config_round_trip(tmp_path):
    """A source with its own LM head (``source_head``), GQA, q/k/v bias and llama3 RoPE scaling, on a toy
    vocabulary: every field survives config.json (no transformers rope warnings) and the logits reload."""
    from transformers import AutoModelForCausalLM

    table = [
        None,
        *(bytes([b]) for b in range(256)),
        b"th",
        b"the",
        b" the",
        b"ing",
        b"ou",
        b"you",
        b"\xe4\xb8\x96",
    ]
    cfg = ModelConfig(
        arch="byteified",
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        mlp_hidden=48,
        qkv_bias=True,
        norm_eps=1e-5,
        rope_scaling=RopeScalingConfig(kind="llama3", factor=8.0, original_max_position=64),
        backbone_window=5,
        d_byte=16,
        n_heads_byte=2,
        encoder_layers=1,
        decoder_layers=1,
        pooling="last",
        chunker="gate",
        source_vocab=len(table),
        source_vocab_bytes=sum(len(t or b"") for t in table),
        source_tied=False,
        boundary_hidden=8,
        max_word_bytes=6,
        max_seq_len=128,
    )
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    model.set_vocabulary(table)
    _perturb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = export_model(model, cfg, tmp_path / "untied")
        config = BytelmConfig.from_pretrained(out)
        assert config.to_model_config() == cfg
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf.model.source_head is not None
    del config.lm_prior  # a config.json written before a field existed: the field's default
    assert config.to_model_config().lm_prior is ModelConfig().lm_prior
    ids = torch.tensor([list(b"the youth, the thing \xe4\xb8\x96 you") + [EOS_ID, *b"ou th"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, segment=True).logits, model(ids).logits, atol=1e-5, rtol=0)
        p = torch.tensor([list(b"you the")])
        assert hf.generate(p, max_new_tokens=6, do_sample=False)[0, p.shape[1] :].tolist() == list(
            generate(model, b"you the", 6, temperature=0)
        )


# a fresh interpreter in which `import bytelm` fails: transformers only
SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoBytelm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "bytelm" or name.startswith("bytelm."):
                raise ImportError("bytelm is not importable here")

    sys.meta_path.insert(0, NoBytelm())
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = torch.load(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(ref["folder"])
    model = AutoModelForCausalLM.from_pretrained(ref["folder"], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ref["ids"], segment=True).logits  # the fused (byte, bit) logits of the parallel path
        gen = model.generate(
            tok(ref["prompt"], return_tensors="pt").input_ids, max_new_tokens=6, do_sample=False
        )
    print("REPORT" + json.dumps({
        "max_err": (logits - ref["logits"]).abs().max().item(), "gen": gen[0].tolist(),
        "modules": sorted(m for m in sys.modules if m.split(".")[0] == "bytelm"),
        "model": type(model.model).__name__,
    }))
    """
)


def test_loads_without_bytelm_in_subprocess(exported, tmp_path):
    model, folder = exported
    ids = torch.tensor([[BOS_ID, *b"Shall I compare thee to a summer's day?"]])
    with torch.no_grad():
        ref = {"folder": str(folder), "ids": ids, "logits": model(ids).logits, "prompt": PROMPT.decode()}
    torch.save(ref, tmp_path / "ref.pt")
    (tmp_path / "check.py").write_text(SUBPROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "check.py"), str(tmp_path / "ref.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert report["model"] == "ByteifiedLM" and report["modules"] == []
    assert report["max_err"] <= 1e-5
    expect = list(PROMPT) + list(generate(model, PROMPT, 6, temperature=0))
    assert report["gen"][: len(expect)] == expect
