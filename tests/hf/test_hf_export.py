"""Hugging Face export: checkpoint -> folder -> from_pretrained gives bytelm's logits and generations, also in
a fresh interpreter where bytelm cannot be imported; CLI, model card, sharding, bf16, push errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from bytelm.config import Config, config_to_dict
from bytelm.data.bytes import BOS_ID
from bytelm.hf.export import ExportError, export_checkpoint, push_folder
from bytelm.models import build_model
from bytelm.models.generate import generate

ARCHS = {  # test name -> the tiny_config fields of the model exported under it
    "flat": {},
    "hierarchical": dict(tie_embeddings=True, gate={"layer": 1}),
    "hierarchical_gate": dict(  # about half the bytes close a chunk at init; causal centring on
        arch="hierarchical",
        chunker="gate",
        tie_embeddings=True,
        gate={"layer": 1, "bias_init": 0.0, "center": True},
    ),
    "mrt5": {},
}
PROMPT = b"To be, or not to be: "


def write_ckpt(path: Path, arch: str, seed: int = 0) -> torch.nn.Module:
    """A bytelm Lightning-format checkpoint (what training writes) with random weights."""
    torch.manual_seed(seed)
    cfg = Config(name=f"tiny-{arch}", model=tiny_config(arch, max_seq_len=256, **ARCHS[arch]))
    model = build_model(cfg.model)
    ckpt = {
        "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
        "bytelm_config": config_to_dict(cfg),
        "global_step": 7,
        "epoch": 0,
        "bytelm_metrics": {"val/bpb": torch.tensor(3.25), "val/loss": 2.25},
    }
    torch.save(ckpt, path)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (bytelm model, exported folder). The flat one is sharded into several safetensors files."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ARCHS:
        model = write_ckpt(root / f"{arch}.ckpt", arch)
        shard = "40KB" if arch == "flat" else "2GB"
        out[arch] = (model, export_checkpoint(root / f"{arch}.ckpt", root / arch, max_shard_size=shard))
    return out


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = json.loads((folder / "config.json").read_text())
    auto = AutoModelForSeq2SeqLM if cfg.get("is_encoder_decoder") else AutoModelForCausalLM
    return auto.from_pretrained(folder, trust_remote_code=True).eval()


def test_folder_contents(exported):
    folder = exported["flat"][1]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "bytelm" and cfg["arch"] == "flat" and cfg["n_layers"] == 2
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_bytelm.BytelmForCausalLM"
    assert cfg["train_seq_len"] == Config().data.seq_len
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 258
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "modeling_bytelm.py",
        "configuration_bytelm.py",
        "tokenization_bytelm.py",
        "flat.py",
        "hierarchical.py",
        "words.py",
        "mrt5.py",
        "README.md",
    ):
        assert (folder / name).exists(), name
    for py in folder.glob("*.py"):  # self-contained: no bytelm import survives
        assert not re.search(r"^\s*(from|import)\s+bytelm\b", py.read_text(), re.M), py.name
    card = (folder / "README.md").read_text()
    assert "val/bpb | 3.2500" in card and "global_step | 7" in card and "tiny-flat" in card
    assert "## Training configuration" in card and "lr:" in card
    s2s = json.loads((exported["mrt5"][1] / "config.json").read_text())
    assert s2s["is_encoder_decoder"] and "AutoModelForSeq2SeqLM" in s2s["auto_map"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_reload_gives_checkpoint_logits(exported, arch):
    model, folder = exported[arch]
    hf = load(folder)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        if arch == "mrt5":
            s = 16
            ref = model(ids, prefix_len=s).logits
            dec = torch.cat([torch.full((2, 1), BOS_ID), ids[:, s:]], 1)
            got = hf(input_ids=ids[:, :s], decoder_input_ids=dec).logits
        else:
            ref = model(ids).logits
            got = hf(ids).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_from_fsdp2_folder(tmp_path):
    """A sharded torch-distributed (FSDP2) checkpoint folder exports through bytelm.checkpoint's
    consolidation, metrics included (the folder is written here in one process, in the layout training
    writes)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    cfg = Config(name="fsdp2-run", model=tiny_config("flat", max_seq_len=256))
    model = build_model(cfg.model).eval()
    folder = tmp_path / "step5.ckpt"
    state = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    torch.save(
        {"bytelm_config": config_to_dict(cfg), "global_step": 5, "bytelm_metrics": {"val/bpb": 2.5}},
        folder / "meta.pt",
    )
    out = export_checkpoint(folder, tmp_path / "out")
    assert "| val/bpb | 2.5000 |" in (out / "README.md").read_text()
    ids = torch.tensor([list(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(load(out)(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_bf16_export(exported, tmp_path):
    from safetensors import safe_open

    model, _ = exported["flat"]
    ckpt = tmp_path / "flat.ckpt"
    write_ckpt(ckpt, "flat")
    out = export_checkpoint(ckpt, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    hf = load(out)
    assert hf.dtype == torch.bfloat16
    ids = torch.tensor([list(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), model(ids).logits, atol=0.1, rtol=0.05)


# A fresh interpreter in which `import bytelm` fails: loads each folder with transformers only and checks the
# logits against the parent's reference, greedy generation and the tokenizer.
SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoBytelm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "bytelm" or name.startswith("bytelm."):
                raise ImportError("bytelm is not importable here")

    sys.meta_path.insert(0, NoBytelm())
    try:
        import bytelm  # noqa: F401
        sys.exit("bytelm is importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    ref = torch.load(sys.argv[1])
    report = {}
    for arch, r in ref.items():
        folder = r["folder"]
        tok = AutoTokenizer.from_pretrained(folder)
        text = "héllo 世界 👋"
        assert tok.decode(tok(text)["input_ids"]) == text and tok(text)["input_ids"] == list(text.encode())
        auto = AutoModelForSeq2SeqLM if arch == "mrt5" else AutoModelForCausalLM
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            if arch == "mrt5":
                logits = model(input_ids=r["enc"], decoder_input_ids=r["dec"]).logits
            else:
                logits = model(r["ids"]).logits
            gen = model.generate(r["prompt"], max_new_tokens=12, do_sample=False)
        entry = {"max_err": (logits - r["logits"]).abs().max().item(), "gen": gen[0].tolist()}
        entry["modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "bytelm")
        report[arch] = entry
    print("REPORT" + json.dumps(report))
    """
)


def test_loads_without_bytelm_in_subprocess(exported, tmp_path):
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 24))
    prompt = torch.tensor([list(PROMPT)])
    ref, expect = {}, {}
    for arch, (model, folder) in exported.items():
        r: dict = {"folder": str(folder), "prompt": prompt}
        with torch.no_grad():
            if arch == "mrt5":
                r["enc"], r["dec"] = ids[:, :10], torch.cat([torch.full((2, 1), BOS_ID), ids[:, 10:]], 1)
                r["logits"] = model(ids, prefix_len=10).logits
                expect[arch] = [BOS_ID, *model.generate(prompt, 12, hard_delete=True)[0].tolist()]
            else:
                r["ids"], r["logits"] = ids, model(ids).logits
                expect[arch] = list(PROMPT) + list(generate(model, PROMPT, 12, temperature=0))
        ref[arch] = r
    torch.save(ref, tmp_path / "ref.pt")
    (tmp_path / "check.py").write_text(SUBPROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
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
    for arch in ARCHS:
        assert report[arch]["max_err"] <= 1e-5, arch
        assert report[arch]["gen"][: len(expect[arch])] == expect[arch], arch
        assert report[arch]["modules"] == [], arch


def test_cli(tmp_path, capsys):
    from bytelm.cli.export import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--push-to-hub" in capsys.readouterr().out
    ckpt = tmp_path / "m.ckpt"
    write_ckpt(ckpt, "flat")
    main([str(ckpt), str(tmp_path / "out"), "--dtype", "fp32", "--max-shard-size", "30KB"])
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("bytelm-export: error: ") and "does not exist" in err, err
    with pytest.raises(SystemExit) as e:
        main([str(ckpt), str(tmp_path / "out3"), "--max-shard-size", "lots"])
    assert e.value.code == 2 and "'lots' is not a size" in capsys.readouterr().err


def test_push_errors_are_clear(exported, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from bytelm.cli.export import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    folder = exported["flat"][1]
    with pytest.raises(ExportError, match="no Hugging Face token"):
        push_folder(folder, "someone/bytelm-tiny")
    with pytest.raises(SystemExit) as e:  # the CLI refuses before exporting
        main(["missing.ckpt", str(tmp_path / "o"), "--push-to-hub", "someone/x"])
    assert e.value.code == 2
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ExportError, match="could not reach the Hugging Face Hub"):
        push_folder(folder, "someone/bytelm-tiny", token="hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE"):
        push_folder(folder, "someone/bytelm-tiny", token="hf_not_a_real_token")
