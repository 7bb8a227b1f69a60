"""Every source as a Hugging Face ``datasets.IterableDataset`` of document records (``documents.features()``).

``doc_dataset(src, split)`` is the single entry point: the embedded corpora (Shakespeare, chatterbot), the
interpreter's own Python sources (pysource), local files (txt / jsonl / parquet, globs), Hub datasets
(``datasets.load_dataset``; a local dataset folder works the same way) and prepared shards
(``bytelm-prepare``). The result is lazy: nothing is read until it is iterated, so the same object serves an
in-memory corpus (iterated once in the main process), a streaming one (iterated by every dataloader worker)
and ``split_dataset_by_node`` (each rank a disjoint set of shards).
"""

from __future__ import annotations

import logging
from typing import Any

from bytelm.config import READER_SOURCES
from bytelm.data.documents import DataError, features, in_split, text_to_bytes

log = logging.getLogger(__name__)

SOURCES = READER_SOURCES
SPLITS = ("train", "validation")


def source_label(src: Any) -> str:
    """The report group of a single-group source (chatterbot documents carry their own language group)."""
    if getattr(src, "label", ""):
        return str(src.label)
    if src.source == "hub":
        return f"hub/{src.hub}"
    return str(src.source)


def doc_dataset(
    src: Any, split: str, *, on_error: str = "raise", min_shards: int = 1, streaming: bool = True
):
    """``datasets.IterableDataset`` of the documents of ``split`` for one source config (``SourceConfig``).

    ``min_shards``: shards wanted (ranks x workers); file sources cut large line-based files to reach it.
    ``streaming``: only for ``hub``: ``load_dataset(..., streaming=True)`` instead of downloading it first.
    """
    from datasets import IterableDataset

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    kind = src.source
    if kind == "shakespeare":
        from bytelm.data.shakespeare import shakespeare_documents, shakespeare_generator

        names = [d.name for d in shakespeare_documents(split)]
        return _relabel(
            IterableDataset.from_generator(
                shakespeare_generator, features=features(), gen_kwargs={"names": names}
            ),
            src,
        )
    if kind == "chatterbot":
        from bytelm.data.chatterbot import chatterbot_generator, chatterbot_shards

        shards = chatterbot_shards(split, list(src.languages))
        return IterableDataset.from_generator(
            chatterbot_generator, features=features(), gen_kwargs={"shards": shards, "split": split}
        )
    if kind == "pysource":
        from bytelm.data.pysource import pysource_files, pysource_generator

        files = pysource_files(split, list(src.paths), int(src.max_bytes))
        kw = {"paths": [p for p, _ in files], "names": [n for _, n in files]}
        return _relabel(
            IterableDataset.from_generator(pysource_generator, features=features(), gen_kwargs=kw), src
        )
    if kind == "wordfreq":
        from bytelm.data.wordfreq import wordfreq_generator, wordfreq_shards

        if src.docs < 1 or src.temperature <= 0:
            raise ValueError(
                f"data.source=wordfreq needs docs >= 1 and temperature > 0, got docs={src.docs}, "
                f"temperature={src.temperature}"
            )
        wkw: dict[str, Any] = {
            "shards": wordfreq_shards(split, list(src.languages)),
            "split": split,
            "docs": int(src.docs),
            "temperature": float(src.temperature),
        }
        return _relabel(
            IterableDataset.from_generator(wordfreq_generator, features=features(), gen_kwargs=wkw), src
        )
    if kind == "files":
        return _files(src, split, on_error, min_shards)
    if kind == "hub":
        return _hub(src, split, on_error, min_shards, streaming)
    if kind == "prepared":
        from bytelm.data.prepare import prepared_generator, prepared_shards

        shards = prepared_shards(src.paths, split)
        return _relabel(
            IterableDataset.from_generator(
                prepared_generator, features=features(), gen_kwargs={"shards": shards}
            ),
            src,
        )
    if kind == "mixture":
        raise ValueError("data.source=mixture: a mixture component cannot itself be a mixture")
    raise ValueError(f"unknown data.source {kind!r}; available: {', '.join((*SOURCES, 'mixture'))}")


def _set_group(rec: dict[str, Any], group: str) -> dict[str, Any]:
    return {"group": group}


def _keep(rec: dict[str, Any], split: str, frac: float) -> bool:
    return bool(rec["error"]) or in_split(rec["data"], split, frac)


def _relabel(ds, src: Any):
    if not getattr(src, "label", ""):
        return ds
    return ds.map(_set_group, fn_kwargs={"group": str(src.label)})


def _files(src: Any, split: str, on_error: str, min_shards: int):
    from datasets import IterableDataset

    from bytelm.data.readers import files_generator, plan_shards, resolve_paths

    use_val_files = split == "validation" and bool(src.val_paths)
    paths = resolve_paths(
        list(src.val_paths if use_val_files else src.paths),
        key="data.val_paths" if use_val_files else "data.paths",
        on_error=on_error,
    )
    if src.val_paths:
        holdout = 0.0  # validation has its own files: every document of paths is training data
    else:
        holdout = float(src.val_fraction)
        if split == "validation" and holdout <= 0:
            raise ValueError("files source: no validation data; set data.val_paths or data.val_fraction > 0")
    shards = plan_shards(paths, src.format, src.txt_unit, min_shards)
    kw = dict(
        split="all" if holdout <= 0 else split,
        val_fraction=holdout,
        text_field=src.text_field,
        txt_unit=src.txt_unit,
        group=source_label(src),
        on_error=on_error,
    )
    return IterableDataset.from_generator(
        files_generator, features=features(), gen_kwargs={"shards": shards, **kw}
    )


def _hub_record(rec: dict[str, Any], *, field: str, group: str, name: str, on_error: str) -> dict[str, Any]:
    value = rec.get(field)
    if value is None or isinstance(value, str | bytes):
        data = text_to_bytes(value) if isinstance(value, str) else (value or b"")
        return {"name": name, "group": group, "data": data, "error": ""}
    msg = f"{name}: field {field!r} is {type(value).__name__}, not text"
    if on_error == "raise":
        raise DataError(msg)
    return {"name": name, "group": group, "data": b"", "error": msg}


def _hub(src: Any, split: str, on_error: str, min_shards: int, streaming: bool):
    from datasets import load_dataset

    if not src.hub:
        raise ValueError(
            "data.source=hub needs data.hub (a dataset name on the Hub, or a local dataset folder)"
        )
    holdout = split == "validation" and not src.val_split
    want = src.train_split if (split == "train" or holdout) else src.val_split
    try:
        ds = load_dataset(src.hub, src.hub_config, split=want, streaming=streaming)
    except ValueError as e:
        if "split" in str(e).lower() and split == "validation":
            raise DataError(
                f"hub dataset {src.hub!r} has no split {want!r} ({e}); set data.val_split to one it has, or "
                f"data.val_split='' to hold out data.val_fraction of {src.train_split!r}"
            ) from None
        raise
    if not streaming:
        ds = ds.to_iterable_dataset(num_shards=max(1, min(min_shards, len(ds))))
    elif ds.num_shards < min_shards and hasattr(ds, "reshard"):
        try:
            ds = ds.reshard()
        except Exception as e:  # noqa: BLE001 - not every format can be resharded
            log.info("hub dataset %s: cannot reshard (%s); %d shards", src.hub, e, ds.num_shards)
    cols = ds.column_names
    if cols is not None and src.text_field not in cols:
        raise DataError(
            f"hub dataset {src.hub!r} split {want!r}: no column {src.text_field!r} (columns: {cols}); "
            "set data.text_field"
        )
    kw = dict(field=src.text_field, group=source_label(src), name=f"{src.hub}:{want}", on_error=on_error)
    ds = ds.map(_hub_record, fn_kwargs=kw, remove_columns=cols, features=features())
    if not src.val_split:  # validation is a content-hash share of train_split
        ds = ds.filter(_keep, fn_kwargs={"split": split, "frac": float(src.val_fraction)})
    return ds
