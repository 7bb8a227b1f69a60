"""``bytelm-prepare OUT [data.key=value ...]``: pre-clean a corpus into memory-mapped uint8 shards with a
document index and a word-boundary index, for corpora read many times (docs/data.md).

The source is any ``data.*`` configuration (Hydra overrides, as for training), e.g.::

    bytelm-prepare data/my_corpus data.source=files 'data.paths=[corpus/*.jsonl]' data.text_field=content
    bytelm-train experiment=hat_tiny data.source=prepared 'data.paths=[data/my_corpus]'

writes ``OUT/train/`` and ``OUT/validation/`` (see ``bytelm.data.prepare``). Word starts are computed with the
model's ``model.max_word_bytes`` (the hierarchical model checks it matches).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from bytelm.cli.errors import add_debug_flag, cli_main, load_config_overrides


@cli_main("bytelm-prepare")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bytelm-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", help="output folder (gets train/ and validation/)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides choosing the source, e.g. data.source=files "
        "'data.paths=[a.jsonl]' (default: the embedded Shakespeare corpus)",
    )
    p.add_argument("--splits", nargs="+", default=["train", "validation"], choices=["train", "validation"])
    p.add_argument("--shard-mb", type=float, default=256.0, help="bytes per shard, in MiB (default 256)")
    p.add_argument("--no-words", action="store_true", help="skip the word-boundary index (flat models only)")
    p.add_argument(
        "--workers", type=int, default=0, help="processes cleaning and splitting words (default 0)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import datasets.config

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    from bytelm.config import config_to_dict
    from bytelm.data.prepare import write_prepared
    from bytelm.data.sources import iter_documents

    cfg = load_config_overrides(args.overrides)
    d = cfg.data
    if d.source in ("mixture", "prepared"):
        p.error(f"data.source={d.source}: prepare each source on its own (then mix prepared sources)")
    src_meta = {k: v for k, v in config_to_dict(cfg)["data"].items() if k != "mixture"}
    for split in args.splits:
        docs = iter_documents(d, split, on_error=d.on_error, streaming=d.streaming)
        bar = tqdm(
            desc=f"prepare {split}",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=args.no_progress,
            file=sys.stderr,
        )
        with bar:
            meta = write_prepared(
                docs,
                Path(args.out) / split,
                words=not args.no_words,
                max_word_bytes=cfg.model.max_word_bytes,
                invalid_utf8=d.invalid_utf8,
                shard_bytes=int(args.shard_mb * (1 << 20)),
                workers=args.workers,
                progress=bar,
                extra_meta={"split": split, "source": src_meta},
            )
        n_docs = sum(s["docs"] for s in meta["shards"])
        n_bytes = sum(s["bytes"] for s in meta["shards"])
        print(
            f"{split}: {n_docs} documents, {n_bytes} bytes in {len(meta['shards'])} shard(s) -> "
            f"{Path(args.out) / split}; stats {json.dumps(meta['stats'])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
