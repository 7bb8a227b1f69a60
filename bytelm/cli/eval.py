"""``bytelm-eval MODEL``: bits-per-byte on held-out English and on each language of the multilingual corpus,
bytes/s, bytes per word / kept ratio, robustness to noise, and CUTE-style character-level tasks.

MODEL is a bytelm checkpoint (``.ckpt``), a run folder (its ``checkpoints/last.ckpt``), a folder written by
``bytelm-export`` (loaded with ``transformers`` and ``trust_remote_code``), a ``.gguf`` or Hugging Face
subword model, or ``teacher`` (the offline SmolLM2-135M teacher, the subword reference row).

Examples:
  bytelm-eval runs/demo/hat_tiny/checkpoints/last.ckpt
  bytelm-eval runs/demo/hat_tiny --tasks bpb,robustness --max-bytes 32768 --json
  bytelm-eval teacher --tasks cute --cute-items 20
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from bytelm.cli.errors import add_debug_flag, cli_main
from bytelm.errors import OptionError
from bytelm.eval.bpb import evaluate_bpb
from bytelm.eval.multilingual import SPLITS
from bytelm.eval.noise import KINDS
from bytelm.eval.scoring import PACKINGS
from bytelm.eval.suite import TASK_NAMES, EvalOptions, format_text, reproduce_command, run_suite

__all__ = ["evaluate_bpb", "main", "build_parser", "options_from_args", "csv_list"]


def csv_list(s: str) -> tuple[str, ...]:
    """Split a comma-separated option: "a, b,,c" -> ("a", "b", "c") (scripts/report.py uses it too)."""
    return tuple(x.strip() for x in s.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    d = EvalOptions()
    p = argparse.ArgumentParser(
        prog="bytelm-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="checkpoint (.ckpt), run folder, exported HF folder, .gguf, or 'teacher'")
    p.add_argument(
        "--tasks",
        type=csv_list,
        default=d.tasks,
        help=f"comma-separated subset of {','.join(TASK_NAMES)} (default: all)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=d.max_bytes,
        help="bytes per evaluated set: English, each language, each noise condition (0 = all)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the noise and of the task generator")
    p.add_argument(
        "--noise-levels",
        type=lambda s: tuple(float(x) for x in csv_list(s)),
        default=d.levels,
        help="fractions of bytes changed (default 0.05,0.15)",
    )
    p.add_argument("--noise-kinds", type=csv_list, default=d.kinds, help=f"subset of {','.join(KINDS)}")
    p.add_argument("--cute-items", type=int, default=d.cute_items, help="items per CUTE-style task")
    p.add_argument("--cute-shots", type=int, default=d.cute_shots, help="solved examples before each item")
    p.add_argument(
        "--languages", type=csv_list, default=(), help="multilingual subset (default: every language)"
    )
    p.add_argument(
        "--multilingual-split",
        choices=SPLITS,
        default=d.ml_split,
        help="chatterbot dialogs scored: validation (held-out 10%%), all, or auto (validation when "
        "the model trained on the corpus, else all)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="row length in bytes (default: the model's training seq_len; teacher: 1024-byte chunks)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default=None, help="name shown in the output (default: the run name)")
    p.add_argument(
        "--segmenter",
        choices=("learned", "tokenizer"),
        default="learned",
        help="byteified models: where patches end when scoring: the model's boundary predictor "
        "(tokenizer-free) or the source tokenizer's token ends; either way bpb is the joint "
        "(byte, boundary) cross-entropy (docs/byteify.md)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="with --segmenter tokenizer: the source model's folder or .gguf (default: the checkpoint's "
        "byteify.source)",
    )
    p.add_argument(
        "--packing",
        choices=PACKINGS,
        default="tiles",
        help="byte models: 'tiles' cuts the packed texts every --seq-len bytes as training validation does; "
        "'documents' starts rows at text starts, as a subword model reads each text (compare with a teacher)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_debug_flag(p)
    return p


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        tasks=tuple(args.tasks),
        max_bytes=args.max_bytes,
        seed=args.seed,
        levels=tuple(args.noise_levels),
        kinds=tuple(args.noise_kinds),
        cute_items=args.cute_items,
        cute_shots=args.cute_shots,
        languages=tuple(args.languages),
        ml_split=args.multilingual_split,
    )


@cli_main("bytelm-eval")
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = options_from_args(args)
    except ValueError as e:  # EvalOptions checks the option values only
        raise OptionError(str(e)) from e
    from bytelm.eval.scoring import load_scorer

    scorer = load_scorer(
        args.model,
        device=args.device,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        name=args.name,
        segmenter=args.segmenter,
        tokenizer=args.tokenizer,
        packing=args.packing,
    )
    res = run_suite(scorer, opts, progress=args.progress)
    extra = [] if args.packing == "tiles" else ["--packing", args.packing]
    res["command"] = reproduce_command(args.model, opts, extra)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_text(res))


if __name__ == "__main__":
    main()
