"""End to end: bytelm-eval on tiny checkpoints, and scripts/report.py on two of them in under a minute."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two tiny trained runs (flat, hierarchical) with CSV logs: ``{name: run folder}``."""
    from bytelm.config import load_config
    from bytelm.train import run

    root = tmp_path_factory.mktemp("eval_runs")
    out = {}
    for exp in ("flat_tiny", "hat_tiny"):
        d = root / exp
        run(load_config([f"experiment={exp}", "debug=cpu", f"trainer.out_dir={d}", "trainer.max_steps=2",
                         "trainer.val_every=1", "logger.kind=csv"]))
        assert (d / "checkpoints" / "last.ckpt").is_file()
        out[exp] = d
    return out


def _report_module():
    spec = importlib.util.spec_from_file_location("bytelm_report", ROOT / "scripts" / "report.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_on_two_tiny_checkpoints(tiny_runs, tmp_path, capsys):
    report = _report_module()
    out = tmp_path / "docs" / "results.md"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\nafter\n")
    t0 = time.perf_counter()
    raw = report.main([
        "--run", f"flat={tiny_runs['flat_tiny'] / 'checkpoints' / 'last.ckpt'}",
        "--run", f"hierarchical={tiny_runs['hat_tiny']}",
        "--teacher", str(tmp_path / "missing.gguf"),  # cannot load: the row is skipped with its reason
        "--max-bytes", "1024", "--cute-items", "2", "--languages", "english,japanese",
        "--bench", str(tmp_path / "no_bench"), "--out", str(out), "--readme", str(readme),
    ])
    took = time.perf_counter() - t0
    assert took < 60, f"report took {took:.1f} s"
    md = out.read_text()
    for needle in ("## Main table", "**flat**", "**hierarchical**", "## Multilingual", "japanese",
                   "## Robustness", "swap@0.05", "space@0.15", "## Character-level", "Teacher reference row skipped",
                   "missing.gguf", "bytelm-eval", "make bench", "majority answer"):
        assert needle in md, needle
    for img in ("bpb_vs_flops", "bpb_vs_wall", "robustness", "multilingual", "cute"):
        p = out.parent / "img" / f"{img}.png"
        assert p.is_file() and p.stat().st_size > 1000, img
        assert f"img/{img}.png" in md
    rd = readme.read_text()
    assert "old" not in rd and "**hierarchical**" in rd and "docs/img/bpb_vs_flops.png" in rd and rd.endswith("after\n")
    printed = capsys.readouterr().out
    assert printed.count("bytelm-eval ") >= 2  # the command of each row is printed
    assert set(raw["results"]) == {"flat", "hierarchical"}
    h = raw["results"]["hierarchical"]
    assert h["model"]["kind"] == "hierarchical" and h["bpb"]["bytes_per_word"] > 1
    assert 0 < h["bpb"]["bpb"] < 10 and h["bpb"]["bytes"] == 1024
    assert json.loads(out.with_suffix(".json").read_text())["curves"]["flat"]["steps"] == [0, 1]
    c = raw["curves"]["hierarchical"]
    assert c["total_steps"] == 2 and c["flops"][1] == pytest.approx(2 * c["flops"][0]) and c["flops_exact"]


def test_train_command_from_run_folder(tmp_path, monkeypatch):
    """The training command next to each row comes from Hydra's overrides.yaml (cwd prefix dropped) or the
    demo's command.txt, found from a checkpoint path or a run folder; None when neither exists."""
    report = _report_module()
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "a"
    (run / "hydra" / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "hydra" / ".hydra" / "overrides.yaml").write_text(
        f"- experiment=hat_tiny\n- trainer.out_dir={tmp_path}/runs/a\n- model.gate.ki=0.01\n")
    want = "python -m bytelm.train experiment=hat_tiny trainer.out_dir=runs/a model.gate.ki=0.01"
    assert report.train_command(str(run / "checkpoints" / "last.ckpt")) == want
    assert report.train_command(str(run)) == want
    demo = tmp_path / "runs" / "demo" / "flat_tiny"
    demo.mkdir(parents=True)
    (demo / "command.txt").write_text("python -m bytelm.train experiment=flat_tiny\n")
    assert report.train_command(str(demo)) == "python -m bytelm.train experiment=flat_tiny"
    assert report.train_command(str(tmp_path / "elsewhere.ckpt")) is None


def test_cli_json_and_text(tiny_runs, capsys):
    from bytelm.cli.eval import main

    ckpt = tiny_runs["flat_tiny"] / "checkpoints" / "last.ckpt"
    main([str(ckpt), "--tasks", "bpb,robustness", "--max-bytes", "512", "--noise-kinds", "delete",
          "--noise-levels", "0.1", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"model", "bpb", "robustness", "command"}
    assert res["bpb"]["bytes"] == 512 and res["bpb"]["bytes_per_s"] > 0
    assert list(res["robustness"]["conditions"]) == ["delete@0.1"]
    assert res["command"].startswith("bytelm-eval ") and "--noise-kinds delete" in res["command"]
    main([str(tiny_runs["hat_tiny"]), "--tasks", "cute", "--cute-items", "1"])
    text = capsys.readouterr().out
    assert "CUTE-style tasks" in text and "hat_tiny (hierarchical" in text


def test_cli_help_and_errors(capsys):
    from bytelm.cli.eval import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--tasks" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown tasks"):
        main(["x.ckpt", "--tasks", "bpb,nope"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["/nonexistent/x.ckpt"])


def test_evaluate_bpb_keeps_its_signature(tiny_runs):
    from bytelm.checkpoint import load_model
    from bytelm.cli.eval import evaluate_bpb

    model, cfg = load_model(tiny_runs["hat_tiny"] / "checkpoints" / "last.ckpt")
    r = evaluate_bpb(model, cfg, max_bytes=300, batch_size=4, seq_len=None, device="cpu", progress=False)
    assert r["bytes"] == 300 and 0 < r["bpb"] < 10 and r["bytes_per_s"] > 0  # the first 300 targets: bytes


def test_multilingual_corpus_and_split():
    from bytelm.config import load_config
    from bytelm.eval.multilingual import multilingual_documents, resolve_split

    docs = multilingual_documents("all")
    assert len(docs) >= 27 and {"english", "chinese", "japanese", "hindi", "russian", "persian"} <= set(docs)
    for lang, ds in docs.items():
        assert ds and all(d.data.decode("utf-8") for d in ds), lang
    held = multilingual_documents("validation")
    assert set(held) == set(docs)
    assert {d.name for d in held["english"]} < {d.name for d in docs["english"]}
    shakespeare, chatter = load_config([]), load_config(["data=chatterbot"])
    assert resolve_split("auto", [shakespeare, None]) == "all"
    assert resolve_split("auto", [shakespeare, chatter]) == "validation"
    assert resolve_split("all", [chatter]) == "all"


def test_exported_folder_scores_like_its_checkpoint(tiny_runs, tmp_path):
    pytest.importorskip("bytelm.hf.export")
    from bytelm.eval.bpb import eval_english
    from bytelm.eval.scoring import load_scorer
    from bytelm.hf.export import export_checkpoint

    ckpt = tiny_runs["hat_tiny"] / "checkpoints" / "last.ckpt"
    folder = export_checkpoint(ckpt, tmp_path / "hf")
    native = load_scorer(ckpt)
    exported = load_scorer(folder, seq_len=native.describe()["seq_len"])
    assert exported.describe()["source"] == "hf-export" and exported.kind == "hierarchical"
    a, b = eval_english(native, 600), eval_english(exported, 600)
    assert b["bpb"] == pytest.approx(a["bpb"], abs=1e-5) and b["bytes_per_word"] == pytest.approx(a["bytes_per_word"])
    ctx, conts = b'Spell "cat":', [b" c a t\n", b" c t a\n"]
    assert exported.continuation_logprobs(ctx, conts) == pytest.approx(native.continuation_logprobs(ctx, conts),
                                                                       abs=1e-4)
