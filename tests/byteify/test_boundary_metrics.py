"""Boundary metrics against a naive per-byte loop; grouped scores are sums of counts; the rule baselines and
the report script run on real texts with real SmolLM2 token ends."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bytelm.eval.boundary import boundary_report, boundary_scores, grouped_boundary_scores
from bytelm.eval.boundary_baselines import BASELINES, pretokenizer_rule, space_punct_rule

ROOT = Path(__file__).resolve().parents[2]


def naive(pred, true, mask=None) -> dict[str, float]:
    tp = fp = fn = tn = 0
    for i in range(len(true)):
        if mask is not None and not mask[i]:
            continue
        p, t = bool(pred[i]), bool(true[i])
        tp += p and t
        fp += p and not t
        fn += t and not p
        tn += not p and not t
    n = tp + fp + fn + tn
    return {
        "accuracy": (tp + tn) / n,
        "precision": tp / (tp + fp),
        "recall": tp / (tp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "n": n,
        "ends": tp + fn,
    }


@pytest.mark.parametrize("seed", range(3))
def test_scores_match_a_naive_loop(seed):
    rng = np.random.default_rng(seed)
    true = rng.random(500) < 0.3
    pred = np.where(rng.random(500) < 0.8, true, ~true)  # 80% right
    mask = rng.random(500) < 0.7
    for m in (None, mask):
        got, want = boundary_scores(pred, true, m), naive(pred, true, m)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-12), k
    # any shape; torch tensors work as they are
    two = boundary_scores(
        torch.from_numpy(pred.reshape(5, 100)),
        torch.from_numpy(true.reshape(5, 100)),
        torch.from_numpy(mask.reshape(5, 100)),
    )
    assert two == boundary_scores(pred, true, mask)


def test_degenerate_groups_and_shape_errors():
    none = np.zeros(4, dtype=bool)
    assert boundary_scores(none, none) == {
        "accuracy": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "n": 4.0,
        "ends": 0.0,
    }
    miss = boundary_scores(none, ~none)
    assert miss["accuracy"] == 0.0 and miss["precision"] == 0.0 and miss["f1"] == 0.0
    assert boundary_scores(none, none, none)["n"] == 0.0
    with pytest.raises(ValueError, match="differ"):
        boundary_scores(none, np.zeros(5, dtype=bool))


def test_grouped_scores_sum_counts_over_rows_and_aggregates():
    rng = np.random.default_rng(0)
    rows = [(g, rng.random(n) < 0.5, rng.random(n) < 0.3) for g, n in (("a", 50), ("b", 70), ("a", 30))]
    got = grouped_boundary_scores(rows, {"ab": ["a", "b", "missing"], "none": ["missing"]})
    assert list(got) == ["a", "b", "ab"]
    cat = {g: [np.concatenate([r[i] for r in rows if r[0] in g]) for i in (1, 2)] for g in ("a", "b", "ab")}
    for g, (p, t) in cat.items():
        assert got[g] == pytest.approx(naive(p, t)), g


TEXTS = {
    "en": [b"Hello, world! It's 2024 -- isn't it?\n", b"Whether 'tis nobler in the mind to suffer"],
    "code": [b"def f(x):\n    return {'a': x[1:]}  # ok\n"],
    "zh": ["\u6211\u4eec\u53bb\u516c\u56ed\uff0c\u597d\u5417\uff1f".encode()],
    "bad": [b"caf\xc3\xa9 \xff ok\xe4\xb8 end"],
}


@pytest.fixture(scope="module")
def tok():
    from bytelm.distill.teacher import load_tokenizer, smollm2_gguf_path

    return load_tokenizer(smollm2_gguf_path())


def test_rule_baselines_on_real_token_ends(tok):
    """Pre-tokenizer pieces never cross a BPE token: every predicted end is a true end (precision 1); the
    space/punctuation rule does well on English and poorly on Chinese."""
    pre = boundary_report(pretokenizer_rule, tok, TEXTS)
    assert all(s["precision"] == 1.0 for s in pre.values()), pre
    sp = boundary_report(space_punct_rule, tok, TEXTS, {"all": list(TEXTS)})
    assert sp["en"]["accuracy"] > 0.8 and sp["zh"]["recall"] < 0.6
    assert sp["all"]["n"] == sum(len(t) for ts in TEXTS.values() for t in ts)
    for rule in BASELINES.values():
        assert rule(b"").shape == (0,) and rule(b"a")[-1]


def test_report_script_help_and_a_small_report(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("boundary_report", ROOT / "scripts" / "boundary_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0 and "--predict" in capsys.readouterr().out
    out = tmp_path / "b.json"
    assert (
        mod.main(
            [
                "--data",
                "shakespeare",
                "--max-bytes",
                "1000",
                "--json",
                str(out),
                "--predict",
                "space_punct",
                "--predict",
                "bytelm.eval.boundary_baselines:pretokenizer_rule",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| shakespeare |" in table and "space_punct acc" in table
    got = json.loads(out.read_text())
    assert got["bytelm.eval.boundary_baselines:pretokenizer_rule"]["shakespeare"]["precision"] == 1.0
