"""Local files as document records: txt, jsonl and parquet (optionally ``.gz`` for txt/jsonl), paths and
globs.

Files are planned into *shards* before any reading: one per file, or byte ranges of one large line-based file
(a line belongs to the range its first byte is in), or parquet row groups. ``datasets`` hands shards to ranks
(``split_dataset_by_node``) and to dataloader workers, so with enough shards every reader gets a disjoint
part of the corpus.

Bad input never crashes silently: a missing file or a malformed jsonl line raises ``DataError`` naming the
file and line (or parquet row); with ``on_error="skip"`` the record is yielded as an error record instead,
and the consumer counts it (``InputStats.errors_skipped``).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import IO, Any

from bytelm.data.documents import DataError, in_split, text_to_bytes

log = logging.getLogger(__name__)

FORMATS = ("txt", "jsonl", "parquet")
TXT_UNITS = ("document", "paragraph", "line")
ON_ERROR = ("raise", "skip")
SHARD_BYTES = 64 << 20  # line-based files are cut into ranges of about this size
_EXT = {
    ".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}  # fmt: skip

Shard = tuple[str, str, int, int]  # (path, format, start, end): byte range [start, end) or parquet row group


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"data.format must be auto or one of {FORMATS}, got {fmt!r}")
        return fmt
    stem = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _EXT:
        raise ValueError(f"{path}: cannot tell the format from the extension {ext!r}; set data.format")
    return _EXT[ext]


def resolve_paths(patterns: list[str], *, key: str = "data.paths", on_error: str = "raise") -> list[str]:
    """Files named by ``patterns`` (files, globs, folders: every file below), sorted, each once.

    A path that does not exist or a glob that matches nothing raises ``FileNotFoundError`` naming it; with
    ``on_error="skip"`` it is kept, and reading it yields one error record (counted).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {on_error!r}")
    out: list[str] = []
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        if glob.has_magic(pat):
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(pat):
            found = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(pat)
                for f in files
                if not f.startswith(".")
            )
        elif os.path.isfile(pat):
            found = [pat]
        else:
            found = []
        if not found:
            msg = (
                f"{key}: {pat!r} does not exist"
                if not glob.has_magic(pat)
                else f"{key}: no file matches {pat!r}"
            )
            if on_error == "raise":
                raise FileNotFoundError(msg)
            log.warning("%s (skipped, on_error=skip)", msg)
            found = [pat]
        out.extend(p for p in found if p not in out)
    if not out:
        raise FileNotFoundError(f"{key} is empty: name the files to read (paths, globs or folders)")
    return out


def plan_shards(
    paths: list[str], fmt: str = "auto", txt_unit: str = "document", min_shards: int = 1
) -> list[Shard]:
    """Shards for ``paths``: at least ``min_shards`` where line-based files allow it (about SHARD_BYTES
    each)."""
    if txt_unit not in TXT_UNITS:
        raise ValueError(f"data.txt_unit must be one of {TXT_UNITS}, got {txt_unit!r}")
    fixed: list[Shard] = []
    split: dict[str, int] = {}  # line-based file -> size
    for p in paths:
        f = detect_format(p, fmt)
        if not os.path.isfile(p):
            fixed.append((p, f, 0, -1))  # missing (on_error=skip): one error record
        elif f == "parquet":
            fixed.extend((p, f, rg, rg + 1) for rg in range(_row_groups(p)))
        elif p.endswith(".gz") or (f == "txt" and txt_unit != "line"):
            fixed.append((p, f, 0, -1))
        else:
            split[p] = os.path.getsize(p)
    pieces = {p: max(1, math.ceil(s / SHARD_BYTES)) for p, s in split.items()}
    while len(fixed) + sum(pieces.values()) < min_shards:  # cut the file with the largest pieces further
        cands = [p for p in pieces if split[p] // (pieces[p] + 1) >= 64]
        if not cands:
            break
        big = max(cands, key=lambda p: split[p] / pieces[p])
        pieces[big] += 1
    shards = list(fixed)
    for p, n in pieces.items():
        size, f = split[p], detect_format(p, fmt)
        bounds = [size * i // n for i in range(n + 1)]
        shards.extend((p, f, bounds[i], bounds[i + 1]) for i in range(n))
    shards.sort(key=lambda s: (paths.index(s[0]), s[2]))
    return shards


def _row_groups(path: str) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_row_groups
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable parquet file: {e}") from None


def _open(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115


def line_number(path: str, offset: int) -> int:
    """1-based number of the line that starts at byte ``offset`` (counted only when reporting an error)."""
    n, done = 1, 0
    with _open(path) as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            n += chunk.count(b"\n")
            done += len(chunk)
    return n


def _lines(f: IO[bytes], start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines whose first byte lies in [start, end) (end < 0: to the end of the
    file)."""
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            f.readline()  # the rest of a line that started in the previous range
    pos = f.tell()
    while end < 0 or pos < end:
        line = f.readline()
        if not line:
            return
        yield pos, line
        pos += len(line)


def _field(obj: Any, field: str) -> Any:
    for part in field.split("."):
        if not isinstance(obj, dict) or part not in obj:
            have = ", ".join(sorted(obj)[:10]) if isinstance(obj, dict) else type(obj).__name__
            raise KeyError(f"no field {field!r} (found: {have})")
        obj = obj[part]
    return obj


def _error(msg: str, name: str, group: str, on_error: str) -> dict[str, object]:
    if on_error == "raise":
        raise DataError(msg)
    return {"name": name, "group": group, "data": b"", "error": msg}


def _jsonl(
    path: str, start: int, end: int, field: str, group: str, on_error: str
) -> Iterator[dict[str, object]]:
    with _open(path) as f:
        for pos, line in _lines(f, start, end):
            if not line.strip():
                continue
            name = f"{path}@{pos}"
            try:
                value = _field(json.loads(line.decode("utf-8", "surrogateescape")), field)
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"field {field!r} is {type(value).__name__}, not a string")
            except (ValueError, KeyError, TypeError) as e:
                reason = e.args[0] if isinstance(e, KeyError) else str(e)
                yield _error(
                    f"{path}:{line_number(path, pos)}: malformed jsonl line: {reason}", name, group, on_error
                )
                continue
            yield {"name": name, "group": group, "data": text_to_bytes(value or ""), "error": ""}


def _txt(path: str, start: int, end: int, unit: str, group: str) -> Iterator[dict[str, object]]:
    with _open(path) as f:
        if unit == "document":
            yield {"name": path, "group": group, "data": f.read(), "error": ""}
            return
        if unit == "line":
            for pos, line in _lines(f, start, end):
                yield {"name": f"{path}@{pos}", "group": group, "data": line.rstrip(b"\r\n"), "error": ""}
            return
        para: list[bytes] = []
        first = 0
        for pos, line in _lines(f, 0, -1):
            if line.strip():
                if not para:
                    first = pos
                para.append(line)
            elif para:
                yield {
                    "name": f"{path}@{first}",
                    "group": group,
                    "data": b"".join(para).rstrip(b"\r\n"),
                    "error": "",
                }
                para = []
        if para:
            yield {
                "name": f"{path}@{first}",
                "group": group,
                "data": b"".join(para).rstrip(b"\r\n"),
                "error": "",
            }


def _parquet(path: str, row_group: int, field: str, group: str, on_error: str) -> Iterator[dict[str, object]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        yield _error(f"{path}: no column {field!r} (columns: {', '.join(names[:10])})", path, group, on_error)
        return
    col = pf.read_row_group(row_group, columns=[field]).column(0)
    for i, value in enumerate(col.to_pylist()):
        name = f"{path}@rg{row_group}:{i}"
        if value is not None and not isinstance(value, str | bytes):
            yield _error(
                f"{path}: row group {row_group}, row {i}: {field!r} is {type(value).__name__}",
                name,
                group,
                on_error,
            )
            continue
        data = text_to_bytes(value) if isinstance(value, str) else (value or b"")
        yield {"name": name, "group": group, "data": data, "error": ""}


def files_generator(
    shards: list[Shard],
    *,
    split: str = "all",
    val_fraction: float = 0.0,
    text_field: str = "text",
    txt_unit: str = "document",
    group: str = "files",
    on_error: str = "raise",
) -> Iterator[dict[str, object]]:
    """``datasets`` generator over file shards. ``split`` train/validation with ``val_fraction``: documents
    are kept by content hash (``documents.in_split``); ``all`` keeps everything."""
    for path, fmt, start, end in shards:
        if not os.path.isfile(path):
            yield _error(f"{path}: no such file", path, group, on_error)
            continue
        try:
            if fmt == "jsonl":
                recs = _jsonl(path, start, end, text_field, group, on_error)
            elif fmt == "parquet":
                recs = _parquet(path, start, text_field, group, on_error)
            else:
                recs = _txt(path, start, end, txt_unit, group)
            for rec in recs:
                if rec["error"]:
                    if split != "validation":  # a held-out stream reads the same files: report errors once
                        yield rec
                elif in_split(rec["data"], split, val_fraction):  # type: ignore[arg-type]
                    yield rec
        except OSError as e:
            yield _error(f"{path}: cannot read: {e}", path, group, on_error)
