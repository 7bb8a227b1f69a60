"""``bytelm-export CKPT OUT``: write a bytelm checkpoint as a self-contained Hugging Face folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` (MrT5:
``AutoModelForSeq2SeqLM``) and ``AutoTokenizer.from_pretrained(OUT)``, offline and without bytelm installed.
"""

from __future__ import annotations

import argparse
import re

from bytelm.cli.errors import add_debug_flag, cli_main


def _shard_size(v: str) -> str | int:
    """A byte count, or a number with a unit (KB, MB, GB, KiB, MiB, GiB, ...)."""
    if v.isdigit():
        return int(v)
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", v, re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{v!r} is not a size such as 500MB, 2GB or a byte count")
    return v


@cli_main("bytelm-export")
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
    add_debug_flag(p)
    args = p.parse_args(argv)

    from bytelm.hf.export import export_checkpoint, hub_token, push_folder

    if args.push_to_hub:  # fail before a long export when the upload cannot happen (ExportError)
        hub_token(args.token)
    out = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"exported {args.ckpt} -> {out}")
    if args.push_to_hub:
        url = push_folder(out, args.push_to_hub, private=args.private, token=args.token)
        print(f"pushed to {url}")


if __name__ == "__main__":
    main()
