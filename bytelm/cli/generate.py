"""``bytelm-generate CKPT --prompt "..."``: sample text from a checkpoint with KV-cached generation."""

from __future__ import annotations

import argparse
import sys

import torch

from bytelm.checkpoint import load_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bytelm-generate", description=__doc__)
    p.add_argument("ckpt", help="bytelm Lightning checkpoint (.ckpt)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-bytes", type=int, default=300, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", default=None, help="stop after any of these characters (e.g. '\\n')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the full forward each byte (slow)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from bytelm.models.generate import stream

    model, _ = load_model(args.ckpt, args.device)
    stop = args.stop.encode("utf-8").decode("unicode_escape").encode("utf-8") if args.stop else None
    sys.stdout.write(args.prompt)
    for piece in stream(model, args.prompt.encode("utf-8"), max_new_bytes=args.max_bytes,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_bytes=stop,
                        seed=args.seed, use_cache=not args.no_cache):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
