"""Boundary accuracy per corpus and per language: predicted token ends vs the source tokenizer's (no model
needed for the labels).

  python scripts/boundary_report.py                                  # both rule baselines, byteify mixture
  python scripts/boundary_report.py --predict my_pkg.boundaries:predict --max-bytes 0 --json out/b.json

Labels are ``bytelm.distill.token_ends`` token ends of the tokenizer (default: the offline SmolLM2-135M).
Texts are the validation groups of a data config (default ``byteify_mixture``: held-out Shakespeare, every
chatterbot language, held-out stdlib files); rows are those groups, the corpora (``chatterbot`` = every
language) and the chatterbot scripts. A predictor is any ``predict(data: bytes) -> bool array`` function,
named as a built-in baseline (``bytelm.eval.boundary_baselines.BASELINES``) or as ``module:function`` (a
byteified model plugs in as a function of the bytes). Targets (docs/byteify.md): >= 99% accuracy on English
and code, >= 98% elsewhere.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="boundary_report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer folder or .gguf file (default: the offline SmolLM2-135M-Instruct GGUF)",
    )
    p.add_argument(
        "--predict",
        action="append",
        default=None,
        metavar="NAME|MODULE:FUNCTION",
        help="predictor to score (repeatable); default: every built-in baseline",
    )
    p.add_argument("--data", default="byteify_mixture", help="data config (bytelm/conf/data/<name>.yaml)")
    p.add_argument("--max-bytes", type=int, default=65536, help="bytes per group (0 = the whole split)")
    p.add_argument("--json", type=Path, default=None, help="also write {predictor: {row: scores}} here")
    return p


def resolve_predictor(spec: str) -> Callable[[bytes], Any]:
    """A built-in baseline name or ``module:function``."""
    from bytelm.eval.boundary_baselines import BASELINES

    if spec in BASELINES:
        return BASELINES[spec]
    if ":" not in spec:
        raise SystemExit(f"--predict {spec!r}: not a baseline ({', '.join(BASELINES)}) nor module:function")
    module, name = spec.split(":", 1)
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise SystemExit(f"--predict {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def texts_and_rows(
    data: str, max_bytes: int
) -> tuple[dict[str, list[bytes]], dict[str, list[str]], list[str]]:
    """Validation texts per group, the aggregates (corpora, scripts) and the row order of the table."""
    from bytelm.config import load_config
    from bytelm.data.chatterbot import GROUP_PREFIX
    from bytelm.data.chatterbot import report_groups as scripts
    from bytelm.data.sources import validation_groups

    cfg = load_config([f"data={data}"])
    groups = {g: [d.data for d in docs] for g, docs in validation_groups(cfg.data, max_bytes).items()}
    langs = [g for g in groups if g.startswith(GROUP_PREFIX)]
    aggregates: dict[str, list[str]] = {"chatterbot": langs} if langs else {}
    aggregates.update(scripts(langs))
    order = [g for g in groups if g not in langs] + list(aggregates) + langs
    return groups, aggregates, order


def table(results: dict[str, dict[str, dict[str, float]]], order: Sequence[str]) -> str:
    """Markdown: one row per group, accuracy and F1 (%) per predictor."""
    names = list(results)
    first = results[names[0]]
    head = "| group | bytes | ends % | " + " | ".join(f"{n} acc | {n} F1" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    for row in order:
        s = first[row]
        cells = [row, f"{int(s['n']):,}", f"{100 * s['ends'] / max(s['n'], 1):.1f}"]
        for n in names:
            r = results[n][row]
            cells += [f"{100 * r['accuracy']:.2f}", f"{100 * r['f1']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bytelm.distill.teacher import load_tokenizer, smollm2_gguf_path
    from bytelm.eval.boundary import boundary_report
    from bytelm.eval.boundary_baselines import BASELINES

    tokenizer = load_tokenizer(args.tokenizer or smollm2_gguf_path())
    groups, aggregates, order = texts_and_rows(args.data, args.max_bytes)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for spec in args.predict or list(BASELINES):
        t0 = time.perf_counter()
        results[spec] = boundary_report(resolve_predictor(spec), tokenizer, groups, aggregates)
        print(f"{spec}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(table(results, order))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
