"""``bytelm-generate CKPT --prompt "..."``: sample text from a checkpoint with KV-cached generation.

The defaults are ``bytelm.models.generate.generate``'s (256 bytes, temperature 1.0: the model's own
distribution); pass ``--temperature 0.7`` or ``--top-k`` for tamer samples, ``--temperature 0`` for greedy."""

from __future__ import annotations

import argparse
import sys

import torch

from bytelm.checkpoint import load_model
from bytelm.cli.errors import add_debug_flag, cli_main
from bytelm.models.generate import DEFAULT_MAX_NEW_BYTES, DEFAULT_TEMPERATURE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bytelm-generate", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "ckpt", help="bytelm checkpoint: Lightning .ckpt, sharded folder or consolidated .safetensors"
    )
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_NEW_BYTES, help="bytes to generate (at most)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
    p.add_argument(
        "--stop",
        default=None,
        help="stop once the output ends with this text (included; escapes such as '\\n' work)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the full forward each byte (slow)")
    p.add_argument(
        "--draft",
        choices=("auto", "on", "off"),
        default="auto",
        help="byteified models: draft each patch from the model's prior and verify it in one pass. auto: for "
        "greedy decoding (the same bytes, faster); on: for sampling too (speculative sampling: exactly the "
        "model's distribution, other bytes for a seed); off: one byte per step",
    )
    p.add_argument(
        "--no-decode-layout",
        action="store_true",
        help="keep PyTorch's weight storage on CPU (default: tall weights stored transposed, which CPU "
        "decoding reads faster; bytelm.models.decode_layout)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_debug_flag(p)
    return p


def parse_stop(text: str) -> bytes:
    """``--stop`` text -> UTF-8 bytes, with backslash escapes (``\\n``, ``\\t``, ``\\x41``) resolved; any
    other character stays itself (``é``, ``日``)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("utf-8")


@cli_main("bytelm-generate")
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from bytelm.models.generate import stream

    model, _ = load_model(args.ckpt, args.device)
    if not args.no_decode_layout:
        from bytelm.models.decode_layout import decode_layout

        decode_layout(model)
    stop = parse_stop(args.stop) if args.stop else None
    sys.stdout.write(args.prompt)
    for piece in stream(
        model,
        args.prompt.encode("utf-8"),
        max_new_bytes=args.max_bytes,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_bytes=stop,
        seed=args.seed,
        use_cache=not args.no_cache,
        draft={"auto": None, "on": True, "off": False}[args.draft],
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
