"""Boundary-predictor metrics: how well predicted patch ends match the source tokenizer's token ends.

A byteified model's boundary predictor is scored per byte against ``bytelm.distill.token_ends`` labels
(docs/byteify.md). In English about one byte in three or four ends a token, in CJK text more than half do,
so accuracy alone says little across scripts; precision, recall and F1 of the *end* class come with it.
Scores are micro-averages: counts are summed over every byte of a group (or of several groups for an
aggregate such as a script) before the ratios, so a long document weighs by its bytes, not as one vote.

A ratio with an empty denominator (no byte predicted as an end, or no true end) is 1.0 when the group has no
end at all and none was predicted (nothing to find, nothing wrong), else 0.0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BoundaryCounts",
    "boundary_counts",
    "boundary_report",
    "boundary_scores",
    "grouped_boundary_scores",
]

Predictor = Callable[[bytes], Any]  # bytes -> (len(data),) bool array-like: True where a token ends


@dataclass
class BoundaryCounts:
    """Confusion counts of the end class over real bytes."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def __add__(self, other: BoundaryCounts) -> BoundaryCounts:
        return BoundaryCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def scores(self) -> dict[str, float]:
        """accuracy, precision, recall, f1 (of the end class), n (bytes counted) and ends (true ends among
        them)."""
        empty = 1.0 if self.tp + self.fp + self.fn == 0 else 0.0

        def ratio(a: int, b: int) -> float:
            return a / b if b else empty

        return {
            "accuracy": ratio(self.tp + self.tn, self.n) if self.n else 1.0,
            "precision": ratio(self.tp, self.tp + self.fp),
            "recall": ratio(self.tp, self.tp + self.fn),
            "f1": ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "n": float(self.n),
            "ends": float(self.tp + self.fn),
        }


def boundary_counts(pred: Any, true: Any, mask: Any = None) -> BoundaryCounts:
    """Counts of predicted vs true ends (any equal shapes; torch CPU tensors work), over ``mask`` (real
    bytes)."""
    p = np.asarray(pred, dtype=bool).ravel()
    t = np.asarray(true, dtype=bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in size: {np.shape(pred)} vs {np.shape(true)}")
    if mask is not None:
        m = np.asarray(mask, dtype=bool).ravel()
        if m.shape != t.shape:
            raise ValueError(f"mask and true differ in size: {np.shape(mask)} vs {np.shape(true)}")
        p, t = p[m], t[m]
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return BoundaryCounts(tp, fp, fn, int(t.size) - tp - fp - fn)


def boundary_scores(pred: Any, true: Any, mask: Any = None) -> dict[str, float]:
    """accuracy, precision, recall, f1 and n of predicted ends ``pred`` against true ends ``true``.

    pred, true: bool array-likes of one shape (e.g. (B, T)); mask: same shape, True on the bytes to count
    (real bytes: not BOS/EOS/padding). Every byte counts when ``mask`` is None.
    """
    return boundary_counts(pred, true, mask).scores()


def grouped_boundary_scores(
    rows: Iterable[tuple[str, Any, Any]], aggregates: Mapping[str, Sequence[str]] | None = None
) -> dict[str, dict[str, float]]:
    """Scores per group from ``(group, pred, true)`` rows (e.g. one per document), plus ``aggregates``:
    name -> member groups (a corpus, a script), whose counts are summed. Groups first (sorted), then
    aggregates."""
    counts: dict[str, BoundaryCounts] = {}
    for group, pred, true in rows:
        counts[group] = counts.get(group, BoundaryCounts()) + boundary_counts(pred, true)
    out = {g: counts[g].scores() for g in sorted(counts)}
    for name, members in (aggregates or {}).items():
        present = [counts[g] for g in members if g in counts]
        if present:
            out[name] = sum(present, BoundaryCounts()).scores()
    return out


def boundary_report(
    predict: Predictor,
    tokenizer: Any,
    groups: Mapping[str, Sequence[bytes]],
    aggregates: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``predict`` (bytes -> bool per byte) against ``tokenizer``'s token ends on the texts of every
    group.

    The labels are ``token_end_masks`` (no model run); ``predict`` may be a rule, or a byteified model wrapped
    as a function of the bytes.
    """
    from bytelm.distill.token_ends import token_end_masks

    rows: list[tuple[str, Any, Any]] = []
    for group, texts in groups.items():
        for data, true in zip(texts, token_end_masks(tokenizer, list(texts)), strict=True):
            pred = np.asarray(predict(data), dtype=bool)
            if pred.shape != (len(data),):
                raise ValueError(f"predict returned shape {pred.shape} for {len(data)} bytes ({group})")
            rows.append((group, pred, true))
    return grouped_boundary_scores(rows, aggregates)


def model_predictor(model: Any, window: int = 512, context: int = 64) -> Predictor:
    """A byteified model's own segmenter as a ``predict(bytes) -> bool array``: windows of ``window`` bytes,
    each read after up to ``context`` earlier bytes (so a window's first decisions see what precedes them),
    the segmenter's lookahead limited to the window's end."""
    import torch

    def predict(data: bytes) -> np.ndarray:
        out = np.zeros(len(data), dtype=bool)
        dev = next(model.parameters()).device
        for a in range(0, len(data), window):
            lo, hi = max(0, a - context), min(len(data), a + window)
            ids = torch.tensor([list(data[lo:hi])], device=dev)
            with torch.no_grad():
                ends = model.segment(ids)[0][0].cpu().numpy()
            out[a:hi] = ends[a - lo :]
        return out

    return predict
