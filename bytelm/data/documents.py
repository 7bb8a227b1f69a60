"""What every source yields: documents of raw bytes, the schema they travel in through ``datasets``, and the
counts of unusual input (docs/design.md#data: bad input is counted and reported, never a crash).

A document is ``(name, data, group, error)``: ``data`` is raw bytes (not necessarily valid UTF-8), ``group``
names the report it belongs to (``shakespeare``, ``chatterbot/japanese``, a file source's label, ...), and a
non-empty ``error`` marks a record that could not be read (a malformed jsonl line kept with
``on_error: skip``): it carries no data and is counted, not trained on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Unreadable input; the message names the file and line (or row)."""


@dataclass(frozen=True)
class Document:
    name: str  # source file, or "<file>:<line>" / "<file>@<byte offset>" for record-based sources
    data: bytes  # raw bytes, not necessarily valid UTF-8
    group: str = ""  # validation report this document belongs to ("" = the source's default)
    error: str = ""  # non-empty: a skipped unreadable record (no data), counted in InputStats.errors_skipped


def features():  # -> datasets.Features (imported lazily: plain corpora need no datasets import)
    """The ``datasets`` schema of a document stream: binary data keeps invalid UTF-8 byte for byte."""
    from datasets import Features, Value

    return Features(
        {"name": Value("string"), "group": Value("string"), "data": Value("binary"), "error": Value("string")}
    )


def as_record(doc: Document) -> dict[str, object]:
    return {"name": doc.name, "group": doc.group, "data": doc.data, "error": doc.error}


def from_record(rec: dict[str, Any]) -> Document:
    data = rec.get("data") or b""
    if isinstance(data, str):  # a text column that was not converted (defensive)
        data = data.encode("utf-8", "surrogatepass")
    return Document(
        str(rec.get("name") or ""), bytes(data), str(rec.get("group") or ""), str(rec.get("error") or "")
    )


def text_to_bytes(text: str) -> bytes:
    """UTF-8 of ``text``; lone surrogates (from ``surrogateescape`` decoding or JSON escapes) become their
    bytes."""
    try:
        return text.encode("utf-8", "surrogateescape")  # round-trips raw bytes decoded with surrogateescape
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def holdout_score(data: bytes) -> float:
    """A stable number in [0, 1) from the content: documents with score < ``val_fraction`` are validation.

    Content (not position) decides, so the split is the same whatever the sharding, worker count or order,
    and duplicated documents always land on the same side.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2.0**64


def in_split(data: bytes, split: str, val_fraction: float) -> bool:
    if split == "all":
        return True
    is_val = holdout_score(data) < val_fraction
    return is_val if split == "validation" else not is_val


@dataclass
class InputStats:
    """Counts of unusual input, reported instead of crashing (docs/design.md#data)."""

    documents: int = 0  # documents kept
    bytes: int = 0  # bytes kept (after replacement)
    empty_skipped: int = 0
    errors_skipped: int = 0  # unreadable records skipped with on_error=skip
    invalid_utf8_docs: int = 0
    control_byte_docs: int = 0  # NUL or other C0 control bytes (kept)
    replaced: int = 0  # documents whose invalid UTF-8 was replaced (invalid_utf8=replace)
    long_docs_split: int = 0  # documents longer than the context, continued over several rows
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d

    def add(self, other: InputStats | dict[str, int]) -> None:
        items = other.as_dict() if isinstance(other, InputStats) else other
        for k, v in items.items():
            if k in self.__dict__ and k != "extra":
                setattr(self, k, getattr(self, k) + int(v))
            else:
                self.extra[k] = self.extra.get(k, 0) + int(v)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> InputStats:
        s = cls()
        s.add(d)
        return s

    def unusual(self) -> bool:
        return bool(
            self.empty_skipped or self.errors_skipped or self.invalid_utf8_docs or self.control_byte_docs
        )


_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 13))
INVALID_UTF8_MODES = ("keep", "replace")


def clean_document(
    data: bytes, invalid_utf8: str, stats: InputStats, *, error: str = "", context: int = 0
) -> bytes | None:
    """Count and (optionally) repair one document. Returns None for a document to skip (empty or unreadable).

    ``context``: the row length; a document longer than it is counted in ``long_docs_split`` (it is not cut
    here: packing continues it over as many rows as it needs).
    """
    if invalid_utf8 not in INVALID_UTF8_MODES:
        raise ValueError(f"data.invalid_utf8 must be 'keep' or 'replace', got {invalid_utf8!r}")
    if error:
        stats.errors_skipped += 1
        return None
    if not data:
        stats.empty_skipped += 1
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_docs += 1
        if invalid_utf8 == "replace":
            data = data.decode("utf-8", errors="replace").encode("utf-8")
            stats.replaced += 1
    if data.translate(None, _CONTROL) != data:
        stats.control_byte_docs += 1
    if context and len(data) + 2 > context:
        stats.long_docs_split += 1
    stats.documents += 1
    stats.bytes += len(data)
    return data
