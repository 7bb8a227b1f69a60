"""Distillation as a training objective: ``ByteLMModule.extra_loss`` built from ``cfg.distill``
(docs/design.md#cross-tokenizer-distillation).

``DistillObjective`` is called inside every training step with the student's batch and output and returns
``(loss, metrics)``; the module adds the loss to the byte cross-entropy and logs the metrics as
``train/<key>``. The losses themselves live in ``align`` / ``alm`` / ``byteprobs`` / ``latent``; this module
only connects a packed training batch to them:

- **Segments.** A packed row holds pieces of several documents (``BOS doc EOS BOS doc ...``), and its first
  input may sit inside a document. The teacher sees each maximal run of *byte targets* (one document's bytes
  inside the row) as one text, after its own start token. Run ``k`` starts at logit row ``a`` (the row that
  predicts its first byte), so its logits ``a .. a + n`` follow the distillation convention "row ``j``
  predicts text byte ``j``, row ``n`` predicts what follows the text" (EOS at a document end). A segment that
  starts mid-document gives the student one byte of context the teacher does not see (the row's first input).
- **Teacher.** A plain attribute, never a submodule: not in the student's ``state_dict``, checkpoints or
  optimizer. It is loaded once when the objective is built (CPU) and moved to the student's device at the
  first step unless ``distill.teacher_device`` pins it. Only the latent projection (a submodule) is trained.
- **Losses.** ``alm_weight * ALM + byte_kl_weight * KL(teacher bytes || student bytes) + latent_weight *
  latent``. ALM uses byte units (both students predict bytes); the latent loss needs word vectors, which the
  hierarchical model returns in ``ModelOutput.hidden`` (``words``, ``word_start``, ``word_end``). Counts are
  all-reduced across ranks, so every loss is normalised by the global number of chunks / bytes / words.
- **Teacher cache.** Training rows are a pure function of (seed, sample index), so runs with the same data
  settings show the teacher the same texts. With ``distill.cache_dir`` set, the teacher-side tensors of each
  step (ALM inputs, byte targets, hidden states; the large ones stored as float16, and used rounded on the
  first run too so that cached and fresh runs agree) are memoised on disk under a key of the teacher, the
  settings and the texts. Re-running a distillation (other weights, other tau) then costs no teacher forward.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bytelm.config import Config, DistillConfig
from bytelm.data.bytes import PAD_ID
from bytelm.distill.align import align_chunks, last_token_in_units
from bytelm.distill.alm import alm_loss
from bytelm.distill.byteprobs import ByteTrie, byte_kl
from bytelm.distill.latent import LatentAlignment
from bytelm.distill.teacher import Teacher, TeacherEncoding, TeacherOutput, default_dtype, load_teacher
from bytelm.models.registry import get_spec

log = logging.getLogger(__name__)

KINDS = ("none", "alm", "byte_kl", "alm_latent", "custom")
ALM_MODES = ("debiased", "append_space", "unconstrained")
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- segments
@dataclass
class Segments:
    """Runs of byte targets in a packed batch: segment ``k`` is row ``row[k]``, logit rows
    ``start[k] .. start[k] + length[k] - 1`` (their targets are ``texts[k]``); ``has_next[k]`` says whether
    logit row ``start + length`` exists in the row (it predicts what follows the text)."""

    texts: list[bytes]
    row: torch.Tensor  # (S,) long
    start: torch.Tensor  # (S,) long
    length: torch.Tensor  # (S,) long
    has_next: torch.Tensor  # (S,) bool

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def max_len(self) -> int:
        return int(self.length.max()) if len(self) else 0


def text_segments(targets: torch.Tensor, min_bytes: int = 1) -> Segments:
    """Segments of a (B, T) target tensor (bytes 0-255; EOS, PAD and IGNORE end a run). A run never crosses
    a document: the target before a document change is always EOS (packed rows read ``... EOS BOS ...``)."""
    t = targets.detach().cpu().numpy()
    B, T = t.shape
    is_byte = (t >= 0) & (t < 256)
    texts: list[bytes] = []
    rows, starts, lengths = [], [], []
    for r in range(B):
        edges = np.diff(np.concatenate([[0], is_byte[r].astype(np.int8), [0]]))
        for a, e in zip(
            np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True
        ):
            if e - a < min_bytes:
                continue
            texts.append(t[r, a:e].astype(np.uint8).tobytes())
            rows.append(r)
            starts.append(a)
            lengths.append(e - a)
    row = torch.tensor(rows, dtype=torch.long)
    start = torch.tensor(starts, dtype=torch.long)
    length = torch.tensor(lengths, dtype=torch.long)
    return Segments(texts, row, start, length, start + length < T)


def segment_logits(logits: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(B, T, V) -> (S, N + 1, V) with N the longest segment: row ``j`` of segment ``k`` is logit row
    ``start[k] + j`` of its batch row (clamped at the row end; rows past a segment are never scored)."""
    B, T, V = logits.shape
    j = torch.arange(seg.max_len + 1, device=logits.device)
    pos = (seg.start.to(logits.device)[:, None] + j).clamp(max=T - 1)  # (S, N+1)
    flat = seg.row.to(logits.device)[:, None] * T + pos
    return logits.reshape(B * T, V)[flat]  # (S, N+1, V), differentiable


def segment_bytes(seg: Segments, device: torch.device | str = "cpu") -> torch.Tensor:
    """(S, N) long: each segment's bytes, padded with PAD."""
    out = torch.full((len(seg), seg.max_len), PAD_ID, dtype=torch.long)
    for k, tx in enumerate(seg.texts):
        out[k, : len(tx)] = torch.frombuffer(bytearray(tx), dtype=torch.uint8).long()
    return out.to(device)


def segment_words(
    seg: Segments, word_start: torch.Tensor, word_end: torch.Tensor, T: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Words of each segment from a hierarchical layout (input positions; word ``w`` covers
    ``[word_start, word_end)``, padded slots start at T). Text byte ``i`` of a segment is input position
    ``start + 1 + i``. Returns the words' batch-word index (S, W'), exclusive text ends (S, W') and a mask:
    every real word whose end falls inside the text (the first may begin before it, in the row's context)."""
    ws, we = word_start.detach().cpu().numpy(), word_end.detach().cpu().numpy()
    per: list[tuple[np.ndarray, np.ndarray]] = []
    for r, a, n in zip(seg.row.tolist(), seg.start.tolist(), seg.length.tolist(), strict=True):
        text_end = we[r] - a - 1
        keep = (ws[r] < T) & (text_end >= 1) & (text_end <= n)
        per.append((np.flatnonzero(keep), text_end[keep]))
    W = max([len(p[0]) for p in per] + [1])
    idx = torch.zeros(len(seg), W, dtype=torch.long)
    ends = torch.zeros(len(seg), W, dtype=torch.long)
    mask = torch.zeros(len(seg), W, dtype=torch.bool)
    for k, (w, e) in enumerate(per):
        m = len(w)
        idx[k, :m] = torch.from_numpy(w)
        ends[k, :m] = torch.from_numpy(e)
        ends[k, m:] = int(e[-1]) if m else 0  # padding: non-decreasing, masked
        mask[k, :m] = True
    return idx, ends, mask


def shared_count(n: torch.Tensor) -> torch.Tensor:
    """Global count / world size: the per-rank denominator that makes DDP's gradient average equal the
    global mean (1 on a single process)."""
    import torch.distributed as dist

    n = n.detach().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        n = n.clone()
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n


# ----------------------------------------------------------------------------------------------- teacher
@dataclass
class TeacherTargets:
    """Teacher-side tensors of one step (all on the student's device)."""

    out: TeacherOutput  # without next_logprobs / hidden_states (the parts below replace them)
    byte_logp: torch.Tensor | None = None  # (S, N, 256)
    byte_mask: torch.Tensor | None = None  # (S, N)
    hidden: torch.Tensor | None = None  # (S, L, Dt)


_ENC_KEYS = ("input_ids", "attention_mask", "spans", "content_mask", "exact_mask", "n_bytes", "n_covered")
_OUT_KEYS = ("token_logprobs", "logprob_mask", "next_space_logprobs")
_HALF = ("byte_logp", "hidden")  # the large tensors: float16 in the cache


def _records(rec: dict[str, torch.Tensor]) -> set[str]:
    """Components present in a cache record: ``base`` (spans, ALM inputs), ``byte``, ``hidden``."""
    have = {"base"} if all(k in rec for k in _ENC_KEYS + _OUT_KEYS) else set()
    if "byte_logp" in rec and "byte_mask" in rec:
        have.add("byte")
    if "hidden" in rec:
        have.add("hidden")
    return have


def _unpack(rec: dict[str, torch.Tensor], texts: list[bytes], device: torch.device) -> TeacherTargets:
    enc = TeacherEncoding(texts, *(rec[k] for k in _ENC_KEYS)).to(device)
    out = TeacherOutput(
        enc,
        token_logprobs=rec["token_logprobs"].to(device),
        logprob_mask=rec["logprob_mask"].to(device),
        next_space_logprobs=rec["next_space_logprobs"].to(device),
    )

    def opt(k: str) -> torch.Tensor | None:
        v = rec.get(k)
        return None if v is None else (v.to(device).float() if v.is_floating_point() else v.to(device))

    return TeacherTargets(out, opt("byte_logp"), opt("byte_mask"), opt("hidden"))


# ------------------------------------------------------------------------------------------------ module
class DistillObjective(nn.Module):
    """``extra_loss`` for ``ByteLMModule``: ``objective(batch, model_output) -> (loss, metrics)``.

    cfg: ``DistillConfig``; d_student: the width of the student's word vectors (``model.d_model``, used by the
    latent loss only); teacher: a ready ``Teacher`` (tests), else loaded from ``cfg.teacher``.
    """

    def __init__(self, cfg: DistillConfig, d_student: int, teacher: Teacher | None = None) -> None:
        super().__init__()
        check_distill_config(cfg)
        self.cfg = cfg
        if teacher is None:
            dev = cfg.teacher_device or "cpu"  # moved to the student's device at the first step
            dtype = _dtype(cfg.teacher_dtype, torch.device(dev))
            teacher = load_teacher(cfg.teacher, device=dev, dtype=dtype)
        self._teacher = [teacher]  # a list: never registered, never saved, never optimised
        self._placed = cfg.teacher_device is not None
        self.trie: ByteTrie | None = _trie_of(teacher) if cfg.byte_kl_weight > 0 else None
        self.latent: LatentAlignment | None = None
        if cfg.latent_weight > 0:
            d_t = int(teacher.model.config.hidden_size)
            self.latent = LatentAlignment(d_student, d_t, metric=cfg.latent_metric)  # type: ignore[arg-type]
        self._cache_id: str | None = None  # the teacher's identity for cache keys, once it is placed

    @property
    def teacher(self) -> Teacher:
        return self._teacher[0]

    # ---- helpers -------------------------------------------------------------------------------------
    def _teacher_id(self, teacher: Teacher) -> str:
        mc = teacher.model.config
        n_params = sum(p.numel() for p in teacher.model.parameters())
        first = next(teacher.model.parameters()).detach().flatten()[:16].float().cpu().tolist()
        return repr(
            (
                CACHE_VERSION,
                self.cfg.teacher,
                mc.model_type,
                teacher.vocab_size,
                n_params,
                [round(x, 6) for x in first],
                str(next(teacher.model.parameters()).dtype),
            )
        )

    def _place_teacher(self, device: torch.device) -> None:
        if self._placed:
            return
        self._placed = True
        t = self.teacher
        if t.device != device:
            dtype = _dtype(self.cfg.teacher_dtype, device)
            t.model.to(device=device, dtype=dtype)
            log.info("distill: teacher moved to %s (%s)", device, dtype)

    def _cache_path(self, texts: list[bytes]) -> Path | None:
        c = self.cfg
        if not c.cache_dir:
            return None
        if self._cache_id is None:
            self._cache_id = self._teacher_id(self.teacher)
        h = hashlib.sha256()
        h.update(repr((self._cache_id, c.latent_layer, c.renormalize, c.max_teacher_tokens)).encode())
        for tx in texts:
            h.update(len(tx).to_bytes(8, "little"))
            h.update(tx)
        key = h.hexdigest()
        return Path(c.cache_dir) / key[:2] / f"{key}.pt"

    def _run_teacher(
        self, seg: Segments, device: torch.device, byte: bool, hidden: bool
    ) -> dict[str, torch.Tensor]:
        """One teacher forward on the segments: a record of CPU tensors (``_records`` names its parts)."""
        c = self.cfg
        t = self.teacher
        enc = t.encode(seg.texts, c.max_teacher_tokens)
        layers = (c.latent_layer,) if hidden else ()
        out = t.forward(enc, next_logprobs=byte, hidden_layers=layers)
        rec = {k: getattr(out.encoding, k).cpu() for k in _ENC_KEYS}
        rec.update({k: getattr(out, k).cpu() for k in _OUT_KEYS})
        if byte:
            trie = self.trie = self.trie if self.trie is not None else _trie_of(t)
            byte_logp, byte_mask = trie.teacher_byte_logprobs(out, seg.max_len, c.renormalize)
            rec["byte_logp"], rec["byte_mask"] = byte_logp.cpu(), byte_mask.cpu()
        if hidden:
            rec["hidden"] = out.hidden_states[c.latent_layer].cpu()
        return rec

    def teacher_targets(self, seg: Segments, device: torch.device) -> TeacherTargets:
        """Run (or read from the cache) the teacher on the segments' texts; everything on ``device``.

        Without a cache only what the active losses need is computed. With one, a step's record holds every
        part (ALM inputs, byte targets, hidden states at ``latent_layer``), so runs with other loss weights
        reuse it; a record that lacks a part (an older, partial one) gets it added."""
        c = self.cfg
        self._place_teacher(device)  # first: the cache key names the teacher's device dtype
        need = {"base"}
        if c.byte_kl_weight > 0:
            need.add("byte")
        if c.latent_weight > 0:
            need.add("hidden")
        path = self._cache_path(seg.texts)
        rec: dict[str, torch.Tensor] = {}
        if path is not None:
            need = {"base", "byte", "hidden"}
            if path.exists():
                try:
                    rec = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e:  # a torn file from a killed run: recompute
                    log.warning("distill cache entry %s unreadable (%s); recomputing", path, e)
        if need - _records(rec):
            rec = self._run_teacher(seg, device, "byte" in need, "hidden" in need)
            if path is not None:
                for k in _HALF:  # float16 on disk, and in this run too: cached and fresh runs agree
                    if k in rec:
                        rec[k] = rec[k].half()
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                torch.save(rec, tmp)
                tmp.replace(path)
        return _unpack(rec, seg.texts, device)

    # ---- the objective -------------------------------------------------------------------------------
    def forward(
        self, batch: dict[str, torch.Tensor], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        logits = out.logits
        dev = logits.device
        seg = text_segments(batch["targets"], c.min_segment_bytes)
        zero = logits.new_zeros((), dtype=torch.float32)  # the CE already connects every student parameter
        if len(seg) == 0:  # nothing to distil here; still join the other ranks' count all-reduces
            for w in (c.alm_weight, c.byte_kl_weight, c.latent_weight):
                if w > 0:
                    shared_count(torch.zeros((), device=dev))
            metrics: dict[str, torch.Tensor] = {"distill_loss": zero.detach()}
            return zero, metrics
        t0 = time.perf_counter()
        tt = self.teacher_targets(seg, dev)
        t_teacher = time.perf_counter() - t0
        s_logits = segment_logits(logits, seg)  # (S, N+1, V)
        total = zero
        metrics = {
            "distill_teacher_s": torch.tensor(t_teacher),
            "distill_segments": torch.tensor(float(len(seg))),
        }
        if c.alm_weight > 0:
            a, st = self.alm(tt, seg, s_logits)
            total = total + c.alm_weight * a
            metrics["alm"] = a.detach()
            metrics.update(st)
        if c.byte_kl_weight > 0:
            assert tt.byte_logp is not None and tt.byte_mask is not None
            n_pos = tt.byte_mask.sum()
            kl = byte_kl(tt.byte_logp, tt.byte_mask, s_logits, shared_count(n_pos).clamp(min=1e-6))
            total = total + c.byte_kl_weight * kl
            metrics["byte_kl"] = kl.detach()
        if c.latent_weight > 0:
            lat = self.latent_loss(tt, seg, out, logits.shape[1])
            total = total + c.latent_weight * lat
            metrics["latent"] = lat.detach()
        metrics["distill_loss"] = total.detach()
        return total, metrics

    def alm(
        self, tt: TeacherTargets, seg: Segments, s_logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        enc, dev = tt.out.encoding, s_logits.device
        al = align_chunks(enc.spans, enc.content_mask, tt.out.logprob_mask, seg.length, None, seg.max_len)
        if c.alm_mode != "unconstrained":  # the row after the text must exist for the "next is a space" term
            no_next = (al.chunk_end == seg.length[:, None]) & ~seg.has_next[:, None]
            al.chunk_valid &= ~no_next
        al = al.to(dev)
        byte_ids = segment_bytes(seg, dev)
        loss, stats = alm_loss(
            tt.out,
            al,
            s_logits,
            byte_ids,
            mode=c.alm_mode,  # type: ignore[arg-type]
            tau=c.tau,
            threshold=c.threshold,
        )
        n = stats["alm_chunks"]
        loss = loss * n.clamp(min=1) / shared_count(n).clamp(min=1e-6)
        return loss, stats

    def latent_loss(self, tt: TeacherTargets, seg: Segments, out: Any, T: int) -> torch.Tensor:
        assert self.latent is not None and tt.hidden is not None
        hidden = getattr(out, "hidden", None) or {}
        if "words" not in hidden:
            raise ValueError(
                "distill.latent_weight > 0 needs a model that returns word vectors "
                "(ModelOutput.hidden['words']): use model.arch=hierarchical"
            )
        words = hidden["words"]  # (B, W, D)
        widx, wends, wmask = segment_words(seg, hidden["word_start"], hidden["word_end"], T)
        enc = tt.out.encoding
        dev = words.device
        tidx, ok = last_token_in_units(enc.spans, enc.content_mask, wends.to(dev), wmask.to(dev))
        D = words.shape[-1]
        flat = seg.row.to(dev)[:, None] * words.shape[1] + widx.to(dev)  # (S, W')
        s_words = words.reshape(-1, D)[flat]  # (S, W', D)
        n = ok.sum()
        return self.latent(s_words, tt.hidden, tidx, ok, shared_count(n).clamp(min=1e-6))


_TRIES: weakref.WeakKeyDictionary[Teacher, ByteTrie] = weakref.WeakKeyDictionary()


def _trie_of(teacher: Teacher) -> ByteTrie:
    """The vocabulary byte-trie of a teacher, built once per teacher object (about a second for 49k
    tokens)."""
    trie = _TRIES.get(teacher)
    if trie is None:
        trie = _TRIES[teacher] = ByteTrie(teacher.table)
    return trie


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return default_dtype(device)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"distill.teacher_dtype must be auto | float32 | bfloat16 | float16, got {name!r}")
    return dt


def check_distill_config(cfg: DistillConfig) -> None:
    """Fail early, naming the key, on settings the objective cannot run."""
    if cfg.kind not in KINDS:
        raise ValueError(f"distill.kind must be one of {KINDS}, got {cfg.kind!r}")
    if cfg.alm_mode not in ALM_MODES:
        raise ValueError(f"distill.alm_mode must be one of {ALM_MODES}, got {cfg.alm_mode!r}")
    if cfg.latent_metric not in ("l2", "cosine"):
        raise ValueError(f"distill.latent_metric must be l2 | cosine, got {cfg.latent_metric!r}")
    for k in ("alm_weight", "byte_kl_weight", "latent_weight"):
        if getattr(cfg, k) < 0 or not math.isfinite(getattr(cfg, k)):
            raise ValueError(f"distill.{k} must be finite and >= 0")
    if cfg.tau <= 0:
        raise ValueError("distill.tau must be > 0")


def build_objective(cfg: Config, teacher: Teacher | None = None) -> DistillObjective | None:
    """The objective for ``cfg`` (None when ``distill.kind`` is ``none`` or every weight is 0)."""
    d = cfg.distill
    check_distill_config(d)
    if d.kind == "none" or (d.alm_weight <= 0 and d.byte_kl_weight <= 0 and d.latent_weight <= 0):
        return None
    spec = get_spec(cfg.model.arch)
    if spec.seq2seq:  # its logits cover only the continuation after the prefix, not the row
        raise ValueError(
            f"distillation supports models with row-aligned logits (flat, hierarchical), not {cfg.model.arch}"
        )
    if d.latent_weight > 0 and not spec.word_vectors:
        raise ValueError("distill.latent_weight > 0 needs word vectors: use model.arch=hierarchical")
    return DistillObjective(d, cfg.model.d_model, teacher)


def attach_objective(
    module: nn.Module, cfg: Config, teacher: Teacher | None = None
) -> DistillObjective | None:
    """Build the objective for ``cfg`` and set it as ``module.extra_loss`` (a registered submodule: its
    projection is saved and optimised; the teacher is not)."""
    with torch.random.fork_rng(devices=[]):  # the student's init must not depend on the teacher / projection
        obj = build_objective(cfg, teacher)
    if obj is not None:
        module.extra_loss = obj
        log.info(
            "distill: %s (alm %.3g, byte_kl %.3g, latent %.3g)",
            cfg.distill.kind,
            cfg.distill.alm_weight,
            cfg.distill.byte_kl_weight,
            cfg.distill.latent_weight,
        )
    return obj
