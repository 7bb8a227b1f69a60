"""``bytelm-export CKPT OUT``: write a bytelm checkpoint as a self-contained Hugging Face folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` (MrT5:
``AutoModelForSeq2SeqLM``) and ``AutoTokenizer.from_pretrained(OUT)``, offline and without bytelm installed.
"""

from __future__ import annotations

import argparse
import sys


def _shard_size(v: str) -> str | int:
    return int(v) if v.isdigit() else v


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="bytelm-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "ckpt",
        help="bytelm checkpoint: a Lightning .ckpt file (or a sharded DeepSpeed / FSDP2 "
        "folder where bytelm.checkpoint can consolidate it)",
    )
    p.add_argument("out", help="output folder (created; existing weight files in it are replaced)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (default fp32)")
    p.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default="2GB",
        help="split safetensors above this size, e.g. 500MB, 2GB or a byte count (default 2GB)",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="also upload the folder to this Hub repo (needs network and a token: `hf auth login` "
        "or HF_TOKEN)",
    )
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    args = p.parse_args(argv)

    from bytelm.hf.export import ExportError, export_checkpoint, hub_token, push_folder

    if args.push_to_hub:  # fail before a long export when the upload cannot happen
        try:
            hub_token(args.token)
        except ExportError as e:
            print(f"bytelm-export: {e}", file=sys.stderr)
            raise SystemExit(2) from e
    try:
        out = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (ExportError, FileNotFoundError, IsADirectoryError, RuntimeError, ValueError) as e:
        print(f"bytelm-export: {e}", file=sys.stderr)
        raise SystemExit(1) from e
    print(f"exported {args.ckpt} -> {out}")
    if args.push_to_hub:
        try:
            url = push_folder(out, args.push_to_hub, private=args.private, token=args.token)
        except ExportError as e:
            print(f"bytelm-export: {e}", file=sys.stderr)
            raise SystemExit(2) from e
        print(f"pushed to {url}")


if __name__ == "__main__":
    main()
