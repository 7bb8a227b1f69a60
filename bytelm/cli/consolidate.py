"""``bytelm-consolidate CKPT OUT.safetensors``: one fp32 state dict from any bytelm checkpoint.

CKPT is a sharded checkpoint folder (DeepSpeed ZeRO 1/2/3: ``latest`` + ``checkpoint/``; FSDP2 distributed
checkpoint: ``.metadata`` + ``*.distcp``), a single ``.ckpt`` file, or a run folder (its newest valid
checkpoint). Writes OUT (safetensors, the bytelm config in its metadata) and OUT with ``.json`` (the config).
Runs in one process on CPU: no GPU and no process group needed. ``bytelm.checkpoint.load_model`` reads OUT
(and the sharded folder itself).

Example:
  bytelm-consolidate runs/hat_small/checkpoints/last.ckpt hat_small.safetensors
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bytelm.checkpoint import consolidate, latest_valid_checkpoint
from bytelm.cli.errors import add_debug_flag, cli_main
from bytelm.errors import OptionError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bytelm-consolidate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ckpt", help="checkpoint folder or file, or a run folder")
    p.add_argument("out", help="output .safetensors path")
    add_debug_flag(p)
    return p


def resolve(ckpt: Path) -> Path:
    """A run folder (with checkpoints/) resolves to its newest valid checkpoint."""
    if ckpt.is_dir() and (ckpt / "checkpoints").is_dir():
        found = latest_valid_checkpoint(ckpt / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint in {ckpt / 'checkpoints'}")
        return found
    return ckpt


@cli_main("bytelm-consolidate")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise OptionError(f"OUT must end in .safetensors (got {args.out!r})")
    src = resolve(Path(args.ckpt))
    weights, cfg_json = consolidate(src, out)
    print(f"{src} -> {weights} (+ {cfg_json.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
