"""End to end: bytelm-eval on tiny checkpoints, and scripts/report.py on two of them in under a minute."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Tiny trained runs with CSV logs: flat and hierarchical on Shakespeare, and the hierarchical one on
    ``data=mixture`` (``hat_tiny_mixture``): ``{name: run folder}``."""
    from bytelm.config import load_config
    from bytelm.train import run

    root = tmp_path_factory.mktemp("eval_runs")
    out = {}
    for name, exp, extra in (
        ("flat_tiny", "flat_tiny", []),
        ("hat_tiny", "hat_tiny", []),
        ("hat_tiny_mixture", "hat_tiny", ["data=mixture"]),
    ):
        d = root / name
        run(
            load_config(
                [
                    f"experiment={exp}",
                    *extra,
                    "debug=cpu",
                    f"trainer.out_dir={d}",
                    "trainer.max_steps=2",
                    "trainer.val_every=1",
                    "logger.kind=csv",
                ]
            )
        )
        assert (d / "checkpoints" / "last.ckpt").is_file()
        out[name] = d
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
    raw = report.main(
        [
            "--run",
            f"flat={tiny_runs['flat_tiny'] / 'checkpoints' / 'last.ckpt'}",
            "--run",
            f"hierarchical={tiny_runs['hat_tiny']}",
            "--multilingual-run",
            f"hierarchical={tiny_runs['hat_tiny_mixture']}",
            "--teacher",
            str(tmp_path / "missing.gguf"),  # cannot load: the row is skipped with its reason
            "--max-bytes",
            "1024",
            "--cute-items",
            "2",
            "--languages",
            "english,japanese",
            "--bench",
            str(tmp_path / "no_bench"),
            "--out",
            str(out),
            "--readme",
            str(readme),
        ]
    )
    took = time.perf_counter() - t0
    assert took < 60, f"report took {took:.1f} s"
    md = out.read_text()
    for needle in (
        "## Main table",
        "**flat**",
        "**hierarchical**",
        "## Multilingual",
        "japanese",
        "## Robustness",
        "swap@0.05",
        "space@0.15",
        "## Character-level",
        "Teacher reference row skipped",
        "missing.gguf",
        "bytelm-eval",
        "make bench",
        "majority answer",
        "multilingual bpb †",
        "English bpb (mixture run)",
        "No multilingual numbers for flat",
    ):
        assert needle in md, needle
    assert "overall" not in md  # no average over scripts a model never saw
    for img in ("bpb_vs_flops", "bpb_vs_wall", "robustness", "multilingual", "cute"):
        p = out.parent / "img" / f"{img}.png"
        assert p.is_file() and p.stat().st_size > 1000, img
        assert f"img/{img}.png" in md
    rd = readme.read_text()
    assert (
        "old" not in rd
        and "**hierarchical**" in rd
        and "docs/img/bpb_vs_flops.png" in rd
        and rd.endswith("after\n")
    )
    printed = capsys.readouterr().out
    assert printed.count("bytelm-eval ") >= 2  # the command of each row is printed
    assert set(raw["results"]) == {"flat", "hierarchical"}
    h = raw["results"]["hierarchical"]
    # multilingual numbers only from a model that trained on the dialogs, scored on the held-out ones
    assert "multilingual" not in raw["results"]["flat"] and raw["results"]["flat"]["multilingual_skipped"]
    assert h["multilingual"]["split"] == "validation" and set(h["multilingual"]["languages"]) == {
        "english",
        "japanese",
    }
    assert (
        h["multilingual_run"]["name"] == str(tiny_runs["hat_tiny_mixture"])
        and h["multilingual_run"]["english_bpb"] > 0
    )
    header = next(ln for ln in md.splitlines() if ln.startswith("| model | type |"))
    assert [c.strip() for c in header.strip("|").split("|")] == report.MAIN_HEADER
    curves = {n: report.Curve(**c) for n, c in raw["curves"].items()}
    untimed = report.main_table(raw["results"], curves, timings=False)  # --no-timings
    assert len(untimed) == 4 and "train time" not in untimed[0] and "eval bytes/s" not in untimed[0]
    assert h["model"]["kind"] == "hierarchical" and h["bpb"]["bytes_per_word"] > 1
    assert 0 < h["bpb"]["bpb"] < 10 and h["bpb"]["bytes"] == 1024
    assert json.loads(out.with_suffix(".json").read_text())["curves"]["flat"]["steps"] == [0, 1]
    c = raw["curves"]["hierarchical"]
    assert c["total_steps"] == 2 and c["flops"][1] == pytest.approx(2 * c["flops"][0]) and c["flops_exact"]


def test_multilingual_language_without_scored_bytes():
    """A language of which a model scores no byte (MrT5 on a 49-byte set) has bpb None, not 0, and stays out
    of the mean over languages."""
    from bytelm.eval.bpb import eval_multilingual
    from bytelm.eval.scoring import CorpusResult

    class HalfScorer:  # scores nothing of a language with under 100 bytes, 2 bits per byte otherwise
        def corpus_nll(self, texts, progress=False):
            n = sum(len(x) for x in texts)
            n = n if n >= 100 else 0
            return CorpusResult(nll=2 * n * 0.6931471805599453, n_bytes=n, seconds=1.0)

    r = eval_multilingual(HalfScorer(), 4096, ["english", "thai"], split="validation")
    assert r["languages"]["thai"] == {"bpb": None, "bytes": 0} and r["scripts"]["Thai"] is None
    assert r["languages"]["english"]["bpb"] == pytest.approx(2.0) and r["macro_bpb"] == pytest.approx(2.0)


def test_report_rejects_a_multilingual_run_without_its_row(tiny_runs):
    report = _report_module()
    with pytest.raises(SystemExit, match="no --run names"):
        report.main(
            ["--run", f"flat={tiny_runs['flat_tiny']}", "--multilingual-run", f"nope={tiny_runs['hat_tiny']}"]
        )


def test_report_cache_reuses_evaluations(tiny_runs, tmp_path):
    """``--cache``: the second evaluation of the same model file, task and options comes from the cache; a
    changed option or a rewritten checkpoint is evaluated again."""
    from bytelm.eval.scoring import load_scorer
    from bytelm.eval.suite import EvalOptions

    report = _report_module()
    spec = str(tiny_runs["flat_tiny"])
    scorer = load_scorer(spec, name="flat")
    opts = EvalOptions(tasks=("bpb", "cute"), max_bytes=256, cute_items=1)
    first = report.evaluate(scorer, spec, opts, tmp_path)
    again = report.evaluate(scorer, spec, opts, tmp_path)
    assert "cached" not in first and again["cached"] == ["bpb", "cute"]
    assert again["bpb"] == first["bpb"] and again["cute"] == first["cute"]
    other = report.evaluate(scorer, spec, EvalOptions(tasks=("bpb",), max_bytes=128), tmp_path)
    assert "cached" not in other and other["bpb"]["bytes"] == 128
    assert report.model_identity("teacher") == "teacher"


def test_equal_flops_rule(tiny_runs):
    """flat_tiny's budget is hat_tiny's training FLOPs as the table counts them; the flat run gets the most
    steps within it (scripts/demo.py, scripts/make_results.sh)."""
    from bytelm.config import load_config
    from bytelm.eval.curves import checkpoint_step, run_training_flops, training_curve
    from bytelm.models.flops import flops_per_byte
    from bytelm.train import steps_for_flops

    hat = tiny_runs["hat_tiny"]
    budget = run_training_flops(hat)
    hat_cfg = load_config(["experiment=hat_tiny", "debug=cpu"])
    assert budget == training_curve(hat / "checkpoints" / "last.ckpt", hat_cfg).total_flops
    assert checkpoint_step(hat) == 2
    flat = load_config(["experiment=flat_tiny", "debug=cpu", f"trainer.flops_budget={budget!r}"])
    per_step = flops_per_byte(flat.model, flat.data.seq_len) * flat.data.batch_size * flat.data.seq_len
    steps = steps_for_flops(flat)
    assert steps * per_step <= budget < (steps + 1) * per_step


def test_tiny_experiments_carry_their_rows_settings():
    """The README's rows are the experiments as configured: hat_tiny and its gate twin 400 steps, and
    flat_tiny the most steps within hat_tiny's training FLOPs at a bytes-per-word the splitter gives (4.2-4.6;
    the exact count comes from the run's logged value, scripts/demo.py)."""
    from dataclasses import replace

    from bytelm.config import load_config
    from bytelm.models.flops import flops_per_byte
    from bytelm.train import steps_for_flops

    hat, flat = load_config(["experiment=hat_tiny"]), load_config(["experiment=flat_tiny"])
    assert hat.trainer.max_steps == 400
    for name in ("hat_tiny_gate", "mrt5_tiny", "mrt5_tiny_nogate", "flat_tiny"):
        c = load_config([f"experiment={name}"])
        assert (c.data.seq_len, c.data.batch_size, c.data.val_max_bytes, c.trainer.val_every) == (
            hat.data.seq_len,
            hat.data.batch_size,
            hat.data.val_max_bytes,
            hat.trainer.val_every,
        ), name
        if name != "flat_tiny":
            assert c.trainer.max_steps == hat.trainer.max_steps, name
    bytes_seen = hat.trainer.max_steps * hat.data.batch_size * hat.data.seq_len
    lo, hi = (flops_per_byte(hat.model, hat.data.seq_len, bpw) * bytes_seen for bpw in (4.6, 4.2))
    assert flat.trainer.flops_budget == 0  # a budget would override debug=cpu's and tests' max_steps
    steps = [steps_for_flops(replace(flat, trainer=replace(flat.trainer, flops_budget=b))) for b in (lo, hi)]
    assert steps[0] <= flat.trainer.max_steps <= steps[1]


def test_train_command_from_run_folder(tmp_path, monkeypatch):
    """The training command next to each row comes from Hydra's overrides.yaml (cwd prefix dropped) or the
    demo's command.txt, found from a checkpoint path or a run folder; None when neither exists."""
    report = _report_module()
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "a"
    (run / "hydra" / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "hydra" / ".hydra" / "overrides.yaml").write_text(
        f"- experiment=hat_tiny\n- trainer.out_dir={tmp_path}/runs/a\n- model.gate.ki=0.01\n"
    )
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
    main(
        [
            str(ckpt),
            "--tasks",
            "bpb,robustness",
            "--max-bytes",
            "512",
            "--noise-kinds",
            "delete",
            "--noise-levels",
            "0.1",
            "--json",
        ]
    )
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
    with pytest.raises(SystemExit) as e:
        main(["x.ckpt", "--tasks", "bpb,nope"])
    assert e.value.code == 2 and "bytelm-eval: error: unknown tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["/nonexistent/x.ckpt"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


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
    assert b["bpb"] == pytest.approx(a["bpb"], abs=1e-5) and b["bytes_per_word"] == pytest.approx(
        a["bytes_per_word"]
    )
    ctx, conts = b'Spell "cat":', [b" c a t\n", b" c t a\n"]
    assert exported.continuation_logprobs(ctx, conts) == pytest.approx(
        native.continuation_logprobs(ctx, conts), abs=1e-4
    )
