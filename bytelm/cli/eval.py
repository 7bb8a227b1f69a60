"""``bytelm-eval CKPT``: validation bits-per-byte of a checkpoint on the embedded corpus's held-out works."""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bytelm.checkpoint import load_model
from bytelm.data.packed import PackedCorpus, TiledWindows
from bytelm.data.sources import load_documents
from bytelm.lit.metrics import bits_per_byte, byte_nll_sum


@torch.no_grad()
def evaluate_bpb(model, cfg, *, max_bytes: int = 0, batch_size: int = 8, seq_len: int | None = None,
                 device: str = "cpu", progress: bool = True) -> dict[str, float]:
    """bpb of ``model`` over the validation split (first ``max_bytes`` ids; 0 = all)."""
    needs_words = cfg.model.arch == "hierarchical" and cfg.model.chunker == "words"
    corpus = PackedCorpus(load_documents(cfg.data, "validation"), invalid_utf8=cfg.data.invalid_utf8,
                          words=needs_words, max_word_bytes=cfg.model.max_word_bytes)
    ds = TiledWindows(corpus, seq_len or cfg.data.seq_len, max_bytes)
    nll, n = 0.0, 0
    t0 = time.perf_counter()
    for batch in tqdm(DataLoader(ds, batch_size=batch_size), desc="eval", disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(batch["input_ids"], targets=batch["targets"], doc_ids=batch["doc_ids"],
                    word_start=batch.get("word_start"))
        if out.loss is not None and "nll_sum" in out.metrics:
            nll += float(out.metrics["nll_sum"])
            n += int(out.metrics["n_bytes"])
        else:
            s, c = byte_nll_sum(out.logits, batch["targets"])
            nll, n = nll + float(s), n + int(c)
    dt = time.perf_counter() - t0
    return {"bpb": bits_per_byte(nll, n), "bytes": n, "bytes_per_s": n / max(dt, 1e-9)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bytelm-eval", description=__doc__)
    p.add_argument("ckpt", help="bytelm Lightning checkpoint (.ckpt)")
    p.add_argument("--max-bytes", type=int, default=0, help="evaluate only the first N validation bytes (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    model, cfg = load_model(args.ckpt, args.device)
    res = evaluate_bpb(model, cfg, max_bytes=args.max_bytes, batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"validation bpb {res['bpb']:.4f} over {res['bytes']} bytes ({res['bytes_per_s']:.0f} bytes/s)")


if __name__ == "__main__":
    main()
