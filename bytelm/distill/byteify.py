"""Byteify a subword LM: build the byteified student from its source; the boundary phase and the two stages.

docs/byteify.md (the design: docs/design.md#byteification). ``model.arch=byteified``
(``bytelm.models.byteified``) keeps the source model's decoder blocks as the backbone; this module is the part
that needs the source model and its tokenizer:

- ``fill_source_fields(cfg)`` writes the source's backbone shape, vocabulary size and start token into
  ``cfg.model`` (so checkpoints and exports rebuild the model from the config alone);
- ``source_tensors(cfg)`` gives every tensor taken from the source (backbone blocks, final norm, embeddings,
  LM head, vocabulary buffers, and the patch projection: zero with ``patch_token_embed``, the default, so the
  untrained model feeds the blocks the source's own inputs; else initialised to the embeddings' statistics),
  which ``bytelm.lit.strategies.build_model_for`` loads into a plain, ZeRO-3-partitioned or FSDP2-sharded
  model;
- ``set_trainable(model, cfg)``: stage 0 (the boundary phase) trains only the byte embedding, the projection
  of the expanded embedding, the encoder and the boundary predictor, with BCE against the tokenizer's token
  ends (no teacher, no backbone: cheap, so it can read far more text than the teacher labels); stage 1 freezes
  the backbone; stage 2 trains it (at ``backbone_lr_mult`` of the learning rate) unless
  ``byteify.freeze_backbone``; the boundary predictor trains in stage 1 and, with ``byteify.train_boundary``
  (the default), in stage 2 (never with word patches, ``chunker=words``, where it has no loss); the source
  embeddings never train; ``byteify.freeze`` (parameter-name prefixes) keeps more frozen in any stage, and
  ``byteify.train_only`` trains only the parameters it names (``make byteify``'s stage 2: ``[pool.]``);
- ``ByteifyObjective``: the losses against the teacher (= the source model, frozen). Stage 1: ``encoder``
  (patch vectors through the first k frozen blocks vs the teacher's hidden state after block k at the same
  token, ``||s - t||_2 / sqrt(d)``), ``alm`` (binarised ALM at temperature ``alm_tau`` between the fused
  head's probability of a patch and the teacher's of the token) and ``boundary`` (BCE of the boundary
  predictor against token ends); the joint (byte, bit) cross-entropy is the module's own loss, with the
  decoder conditioned on the teacher's final hidden states. Stage 2 keeps ``boundary`` (labels from the
  tokenizer alone: no teacher forward) and ``alm`` when ``stage2_alm_weight`` > 0.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bytelm.config import ByteifyConfig, Config
from bytelm.distill.alm import STUDENT_SPACE_IDS, alm_chunk_loss
from bytelm.distill.teacher import Teacher
from bytelm.models.byteified import SEGMENTER_COPIES, segmenter_snapshot
from bytelm.models.config import RopeScalingConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_SOURCES: dict[
    str, tuple[Any, Any]
] = {}  # resolved source path -> (hf_model, tokenizer), loaded once per process


def _source_key(path: str | None) -> str:
    from bytelm.distill.teacher import smollm2_gguf_path

    return str(Path(path).resolve()) if path else str(smollm2_gguf_path())


def load_source_once(path: str | None) -> tuple[Any, Any]:
    """(hf_model, tokenizer) of the source, loaded once per process (builder and teacher share it)."""
    from bytelm.distill.transplant import load_source

    key = _source_key(path)
    if key not in _SOURCES:
        if path and not Path(path).exists():
            raise FileNotFoundError(
                f"byteify.source={path!r} does not exist (a local HF folder or .gguf file)"
            )
        _SOURCES[key] = load_source(path)
    return _SOURCES[key]


def source_table(tokenizer: Any, vocab: int) -> list[bytes | None]:
    from bytelm.distill.tokens import token_bytes_table

    return token_bytes_table(tokenizer, vocab)[:vocab]


def fill_source_fields(cfg: Config) -> None:
    """Set ``cfg.model``'s backbone and source fields from the source model (in place; logs what changed)."""
    from bytelm.distill.transplant import source_embeddings, source_fields

    model, tok = load_source_once(cfg.byteify.source)
    fields = source_fields(model.config)
    emb, head = source_embeddings(model)
    vocab = int(emb.shape[0])
    table = source_table(tok, vocab)
    fields.update(
        source_vocab=vocab,
        source_vocab_bytes=sum(len(t or b"") for t in table),
        source_start_id=Teacher(model, tok).start_id,
        source_tied=head is None,
    )
    changed = []
    for k, v in fields.items():
        cur = getattr(cfg.model, k)
        cur = asdict(cur) if k == "rope_scaling" else cur
        if cur != v:
            changed.append(f"{k}: {cur!r} -> {v!r}")
            setattr(cfg.model, k, RopeScalingConfig(**v) if k == "rope_scaling" else v)
    if changed:
        log.info("byteify: model fields from the source: %s", "; ".join(changed))


def source_tensors(cfg: Config) -> dict[str, torch.Tensor]:
    """Every tensor of a byteified model that comes from the source (names as in ``ByteifiedLM``)."""
    from bytelm.distill.transplant import backbone_state_dict, source_embeddings

    model, tok = load_source_once(cfg.byteify.source)
    out = dict(backbone_state_dict(model))
    emb, head = source_embeddings(model)
    out["source_embed.weight"] = emb
    if head is not None:
        out["source_head.weight"] = head
    table = source_table(tok, int(emb.shape[0]))
    blob = b"".join(t or b"" for t in table)
    out["vocab_bytes"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    lens = torch.tensor([len(t or b"") for t in table], dtype=torch.long)
    out["vocab_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    # with patch_token_embed the pooled state is a correction to the patch token's embedding that starts at
    # zero (the untrained model then feeds the blocks exactly the source's inputs); without it the patch
    # vectors start with the embeddings' statistics: mean as the bias, per-entry std through the weight
    mean = emb.float().mean(0)
    std = float((emb.float() - mean).std())
    d = cfg.model.d_byte
    if cfg.model.patch_token_embed:
        out["pool.proj.weight"] = torch.zeros(cfg.model.d_model, d)
        out["pool.proj.bias"] = torch.zeros_like(mean)
    else:
        gen = torch.Generator().manual_seed(cfg.trainer.seed)
        out["pool.proj.weight"] = torch.randn(cfg.model.d_model, d, generator=gen) * (std / math.sqrt(d))
        out["pool.proj.bias"] = mean
    return out


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], kind: str = "plain") -> None:
    """Copy full tensors into ``model``'s parameters/buffers of the same names, whether they are plain,
    ZeRO-3-partitioned (gathered, rank 0 writes) or FSDP2 ``DTensor`` s (each rank keeps its shard). Every
    name must exist with the same shape: a mismatch is an error naming it."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name, t in tensors.items():
        p = params.get(name)
        target = p if p is not None else buffers.get(name)
        if target is None:
            raise ValueError(f"byteify: the model has no parameter or buffer named {name!r}")
        shape = tuple(getattr(target, "ds_shape", target.shape))
        if shape != tuple(t.shape):
            raise ValueError(
                f"byteify: {name} has shape {shape} in the model, {tuple(t.shape)} from the source"
            )
        with torch.no_grad():
            if kind == "zero3" and hasattr(target, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    target.data.copy_(t.to(target.dtype))
            elif kind == "fsdp2" and p is not None:
                from torch.distributed.tensor import DTensor, distribute_tensor

                if isinstance(target, DTensor):
                    shard = distribute_tensor(
                        t.to(target.dtype).to(target.device),
                        target.device_mesh,
                        target.placements,
                        src_data_rank=None,
                    )
                    target.copy_(shard)
                else:
                    target.copy_(t.to(target.dtype))
            else:
                target.copy_(t.to(device=target.device, dtype=target.dtype))


def is_backbone(name: str) -> bool:
    return name.startswith(("backbone.", "backbone_norm."))


def set_trainable(model: torch.nn.Module, c: ByteifyConfig) -> None:
    """requires_grad by stage (module docstring). With word patches (the ablation) the boundary predictor has
    no loss and stays frozen (DDP refuses parameters that get no gradient)."""  # noqa: D401
    words = getattr(getattr(model, "cfg", None), "chunker", "gate") == "words"
    seg_frozen = bool(getattr(model, "segmenter_frozen", False))  # the segmenter is a frozen snapshot
    names = [n for n, _ in model.named_parameters()]
    for key in ("freeze", "train_only"):
        unknown = [f for f in getattr(c, key) if not any(n.startswith(f) for n in names)]
        if unknown:
            raise ValueError(
                f"byteify.{key}: {unknown} match no parameter of the model (prefixes of names such as "
                f"{names[:3]})"
            )
    for name, p in model.named_parameters():
        train = True
        if name.startswith("segmenter."):  # the segmenter's own encoder: a copy, never trained
            train = False
        elif c.stage == 0:  # the boundary phase: what the boundary logits read, nothing else
            train = name.startswith((*SEGMENTER_COPIES, "boundary."))
        elif name.startswith(("source_embed.", "source_head.", "first_word")):
            train = False
        elif is_backbone(name):
            train = c.stage == 2 and not c.freeze_backbone
        elif name.startswith("boundary."):
            train = (c.stage == 1 or c.train_boundary) and not words and not seg_frozen
        if name.startswith(tuple(c.freeze)) or (c.train_only and not name.startswith(tuple(c.train_only))):
            train = False
        p.requires_grad_(train)


def init_from_checkpoint(model: torch.nn.Module, path: str, kind: str = "plain", stage: int = 1) -> None:
    """Load the model weights of a checkpoint: a Lightning ``.ckpt`` file or a DeepSpeed/FSDP2 checkpoint
    folder (consolidated with ``bytelm.checkpoint``). A model with its own segmenter encoder
    (``model.segmenter_encoder``) that starts stage 1 or 2 from a boundary-phase checkpoint freezes it here:
    the segmenter gets a copy of the encoder the boundary phase trained (``segmenter_snapshot``), and later
    training moves the shared encoder only."""
    from bytelm.checkpoint import consolidated_state_dict

    if not Path(path).exists():
        raise FileNotFoundError(f"byteify.init_from={path!r} does not exist")
    state, ck_cfg = consolidated_state_dict(path)
    ready = state.get("segmenter_ready")
    from_phase0 = ck_cfg.byteify.stage == 0 and (ready is None or not bool(ready.sum()))
    if stage >= 1 and from_phase0 and getattr(model, "segmenter", None) is not None:
        state = {**state, **segmenter_snapshot(state)}
        log.info("byteify: the segmenter's encoder is frozen as %s left it", path)
    load_tensors(model, state, kind)
    log.info("byteify: initialised from %s (%d tensors)", path, len(state))


def check_byteify_config(c: ByteifyConfig) -> None:
    if c.stage not in (0, 1, 2):
        raise ValueError(f"byteify.stage must be 0, 1 or 2, got {c.stage!r}")
    for k in ("encoder_weight", "alm_weight", "stage2_alm_weight", "boundary_weight", "backbone_lr_mult"):
        v = getattr(c, k)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"byteify.{k} must be finite and >= 0, got {v!r}")
    if c.encoder_blocks < 1:
        raise ValueError(f"byteify.encoder_blocks must be >= 1, got {c.encoder_blocks}")
    if c.alm_tau <= 0:
        raise ValueError(f"byteify.alm_tau must be > 0, got {c.alm_tau}")


# ------------------------------------------------------------------------------------------- teacher targets
@dataclass
class TokenTargets:
    """Teacher-side targets of one batch, per teacher token (N tokens over the batch).

    ``pos`` (N,) flat index ``row * T + last byte`` of each token; ``first`` (N,) flat index of its first
    byte; ``ctx`` / ``probe`` (N, D) fp16 final hidden / hidden after k blocks; ``exact`` (N,) bool: the
    token's bytes are the text's (ALM and encoder loss use only these); ``logp`` / ``space`` (N,) teacher
    log-prob of the token and of "the next token starts a word"; ``start_ctx`` / ``start_probe`` (D,) the
    states at the start token (specials' patches).
    """

    pos: torch.Tensor
    first: torch.Tensor
    ctx: torch.Tensor
    probe: torch.Tensor
    exact: torch.Tensor
    logp: torch.Tensor
    space: torch.Tensor
    start_ctx: torch.Tensor
    start_probe: torch.Tensor


def byte_segments(ids: torch.Tensor, doc_ids: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(row, start, end) of every maximal run of bytes (< 256) inside one document, over input positions."""
    out = []
    a = ids.cpu().numpy()
    d = doc_ids.cpu().numpy() if doc_ids is not None else None
    B, T = a.shape
    for r in range(B):
        t = 0
        while t < T:
            if a[r, t] >= 256:
                t += 1
                continue
            s = t
            while t < T and a[r, t] < 256 and (d is None or d[r, t] == d[r, s]):
                t += 1
            out.append((r, s, t))
    return out


class ByteifyObjective(torch.nn.Module):
    """``ByteLMModule.extra_loss`` for byteification: ``prepare(batch)`` adds the stage-1 inputs (teacher
    token ends, teacher context) before the student's forward; ``__call__(batch, out)`` returns the extra
    losses."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        check_byteify_config(cfg.byteify)
        self.c = cfg.byteify
        self.cache_dir = Path(cfg.distill.cache_dir) if cfg.distill.cache_dir else None
        self.source = _source_key(cfg.byteify.source)
        model, tok = load_source_once(cfg.byteify.source)
        n_src = int(model.config.num_hidden_layers)
        if cfg.byteify.encoder_blocks > n_src:
            raise ValueError(
                f"byteify.encoder_blocks={cfg.byteify.encoder_blocks} exceeds the source's {n_src} "
                f"blocks (byteify.source={cfg.byteify.source!r})"
            )
        self._teacher = Teacher(model, tok)  # plain attribute: never in the state dict
        self.alm_weight = cfg.byteify.alm_weight if cfg.byteify.stage == 1 else cfg.byteify.stage2_alm_weight
        self.words = cfg.model.chunker == "words"  # the word-patch ablation: no boundary predictor to train
        self.max_word_bytes = cfg.model.max_word_bytes
        self.threshold = cfg.model.boundary_threshold  # boundary_f1 scores the decisions the model makes

    @property
    def teacher(self) -> Teacher:
        return self._teacher

    # -- teacher side --------------------------------------------------------------------------------------
    def _key(self, ids: torch.Tensor, doc_ids: torch.Tensor | None) -> str:
        h = hashlib.sha1()
        h.update(f"v{CACHE_VERSION}|{self.source}|k{self.c.encoder_blocks}|{tuple(ids.shape)}".encode())
        h.update(ids.cpu().numpy().tobytes())
        if doc_ids is not None:
            h.update(doc_ids.cpu().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def targets(self, ids: torch.Tensor, doc_ids: torch.Tensor | None) -> TokenTargets:
        """Teacher targets of a batch, from the disk cache when ``distill.cache_dir`` is set and holds
        them."""
        path = None
        if self.cache_dir is not None:
            key = self._key(ids, doc_ids)
            path = self.cache_dir / key[:2] / f"{key}.pt"
            if path.exists():
                try:
                    return TokenTargets(**torch.load(path, map_location="cpu", weights_only=True))
                except Exception as e:  # a torn or corrupt entry is recomputed, never trusted
                    log.warning("byteify: unreadable teacher cache entry %s (%s); recomputing", path, e)
        tt = self._compute(ids, doc_ids)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(tt.__dict__, tmp)
            os.replace(tmp, path)
        return tt

    def _compute(self, ids: torch.Tensor, doc_ids: torch.Tensor | None) -> TokenTargets:
        teacher, k = self.teacher, self.c.encoder_blocks
        B, T = ids.shape
        segs = byte_segments(ids, doc_ids)
        a = ids.cpu()
        texts = [bytes(a[r, s:e].to(torch.uint8).tolist()) for r, s, e in segs]
        pos, first, ctx, probe, exact, logp, space = [], [], [], [], [], [], []
        out = teacher([b""], hidden_layers=(k, -1))  # the start token alone
        start_ctx, start_probe = out.hidden_states[-1][0, 0], out.hidden_states[k][0, 0]
        for i in range(0, len(texts), 8):  # a few segments per teacher forward
            chunk = list(range(i, min(i + 8, len(texts))))
            o = teacher([texts[j] for j in chunk], hidden_layers=(k, -1))
            enc = o.encoding
            for b, j in enumerate(chunk):
                r, s, _ = segs[j]
                n = int(enc.attention_mask[b].sum())
                sp = enc.spans[b, 1:n]  # (L-1, 2) text tokens
                ok = (sp[:, 1] > sp[:, 0]) & enc.content_mask[b, 1:n]
                idx = torch.nonzero(ok).squeeze(1) + 1  # teacher positions of usable tokens
                pos.append(r * T + s + enc.spans[b, idx, 1] - 1)
                first.append(r * T + s + enc.spans[b, idx, 0])
                ctx.append(o.hidden_states[-1][b, idx].half())
                probe.append(o.hidden_states[k][b, idx].half())
                exact.append(enc.exact_mask[b, idx])
                logp.append(o.token_logprobs[b, idx])
                space.append(o.next_space_logprobs[b, idx])
        D = start_ctx.shape[-1]

        def cat(xs: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(xs).cpu() if xs else torch.zeros(shape, dtype=dtype)

        return TokenTargets(
            pos=cat(pos, (0,), torch.long),
            first=cat(first, (0,), torch.long),
            ctx=cat(ctx, (0, D), torch.float16),
            probe=cat(probe, (0, D), torch.float16),
            exact=cat(exact, (0,), torch.bool),
            logp=cat(logp, (0,), torch.float32),
            space=cat(space, (0,), torch.float32),
            start_ctx=start_ctx.half().cpu(),
            start_probe=start_probe.half().cpu(),
        )

    @torch.no_grad()
    def token_ends(self, ids: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, T) bool: the source tokenizer's token ends on each document's bytes of the batch (tokenizer
        only, no teacher forward: the cheap boundary labels of ``bytelm.distill.token_ends``)."""
        from bytelm.distill.token_ends import batch_token_ends

        return batch_token_ends(self.teacher.tokenizer, ids, doc_ids)

    # -- batch preparation ---------------------------------------------------------------------------------
    def prepare(self, batch: dict[str, torch.Tensor]) -> None:
        """Stage 1: put teacher token ends (``patch_end``) and teacher context (``context``) into the batch,
        and ask the model for the probe; keep the token targets for the loss. Stage 2: only what the losses
        need."""
        self._tt = None
        self._ends: torch.Tensor | None = None
        if not self.training:
            return
        ids, doc_ids = batch["input_ids"], batch.get("doc_ids")
        B, T = ids.shape
        dev = ids.device
        if self.c.stage == 0:  # the boundary phase: tokenizer ends, the model stops after the boundary logits
            self._ends = self.token_ends(ids, doc_ids).to(dev)
            batch["patch_end"] = self._ends
            batch["boundary_only"] = True  # type: ignore[assignment]
            return
        if self.c.stage == 2 and self.alm_weight == 0:
            if self.c.train_boundary and not self.words:  # boundary labels from the tokenizer alone
                self._ends = self.token_ends(ids, doc_ids).to(dev)
            return
        tt = self.targets(ids, doc_ids)
        self._tt = tt
        ends = torch.zeros(B * T, dtype=torch.bool)
        ends[tt.pos] = True
        self._ends = ends.view(B, T).to(dev)
        if self.c.stage != 1:
            return
        if self.words:  # ablation: word patches get the teacher state of the last token ending in the word
            tt, word_ends = word_targets(tt, ids, doc_ids, self.max_word_bytes)
            self._patch_targets = tt
            self._ends = word_ends.to(dev)  # the patches the model makes itself (``segment``), not tokens
        else:
            self._patch_targets = tt
        D = tt.ctx.shape[-1]
        ctx = (
            tt.start_ctx.float().expand(B * T, D).clone()
        )  # specials (and unused positions): the start state
        ctx[tt.pos] = tt.ctx.float()
        batch["patch_end"] = self._ends
        batch["context"] = ctx.view(B, T, D).to(dev)
        batch["probe_blocks"] = self.c.encoder_blocks  # type: ignore[assignment]

    # -- losses --------------------------------------------------------------------------------------------
    def forward(
        self, batch: dict[str, torch.Tensor], out: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from bytelm.distill.objective import shared_count

        logits = out.logits
        dev = logits.device
        zero = logits.sum() * 0.0
        total = zero
        metrics: dict[str, torch.Tensor] = {}
        tt = getattr(self, "_tt", None)
        ends = getattr(self, "_ends", None)
        hid = out.hidden
        if ends is None:
            return total, metrics
        ids = batch["input_ids"]
        B, T = ids.shape
        if (
            self.c.stage in (0, 1) or self.c.train_boundary
        ) and not self.words:  # BCE against token ends, real bytes
            mask = ids < 256
            mask[:, -1] = False  # the row's last byte has no next byte to look at
            bl = hid["boundary_logits"]
            per = F.binary_cross_entropy_with_logits(bl, ends.float(), reduction="none")
            n = mask.sum()
            bce = (per * mask).sum() / shared_count(n).clamp(min=1e-6)
            pred = (bl > self.threshold) & mask
            tp = (pred & ends).sum().float()
            metrics["boundary_bce"] = bce.detach() * shared_count(n) / n.clamp(min=1)
            metrics["boundary_f1"] = (2 * tp / (pred.sum() + (ends & mask).sum()).clamp(min=1)).detach()
            metrics["boundary_acc"] = (((bl > self.threshold) == ends) & mask).sum() / n.clamp(min=1)
            if self.c.stage > 0:  # stage 0: the model's own loss is this BCE already
                total = total + self.c.boundary_weight * bce
        if tt is not None and self.c.stage == 1 and self.c.encoder_weight > 0 and "probe" in hid:
            probe = hid["probe"]  # (B, W, D) after k blocks
            last = hid["patch_last"]  # (B, W)
            flat = (last + torch.arange(B, device=dev).unsqueeze(1) * T).view(-1)
            D = probe.shape[-1]
            pt = self._patch_targets
            target = pt.start_probe.float().to(dev).expand(B * T, D).clone()
            valid = torch.zeros(B * T, dtype=torch.bool, device=dev)
            target[pt.pos.to(dev)] = pt.probe.float().to(dev)
            valid[pt.pos.to(dev)] = pt.exact.to(dev)
            real = (hid["word_end"] <= T).view(-1) & (hid["word_start"] < T).view(-1)
            v = valid[flat] & real
            dist = (probe.reshape(-1, D).float() - target[flat]).norm(dim=-1) / math.sqrt(D)  # (B*W,)
            n = v.sum()
            enc = (dist * v).sum() / shared_count(n).clamp(min=1e-6)
            metrics["encoder_l2"] = enc.detach() * shared_count(n) / n.clamp(min=1)
            total = total + self.c.encoder_weight * enc
        if tt is not None and self.alm_weight > 0:
            alm, n = self.alm(out, ids, tt)
            metrics["alm"] = alm.detach() * shared_count(n) / n.clamp(min=1)
            total = total + self.alm_weight * alm
        return total, metrics

    def alm(self, out: Any, ids: torch.Tensor, tt: TokenTargets) -> tuple[torch.Tensor, torch.Tensor]:
        """Binarised ALM on token chunks: the student's log-likelihood of a token's (byte, bit) symbols (its
        bytes, none of them ending a patch but the last: the fused head's probability of the whole patch,
        comparable with the teacher's token probability) vs the teacher's log-prob of the token; with
        ``alm_debias`` both sides add "the next unit starts a word". Tokens whose first byte is the row's
        first input have no student prediction and are skipped."""
        from bytelm.distill.objective import shared_count

        B, T = ids.shape
        logits = out.logits
        dev = logits.device
        sym_lp = out.hidden["target_logprobs"].reshape(B * T)  # (B*T,) log p(symbol j+1 | <= j)
        csum = torch.cat([torch.zeros(1, device=dev), sym_lp.cumsum(0)])
        first, last = tt.first.to(dev), tt.pos.to(dev)
        ok = tt.exact.to(dev) & (first % T > 0)
        s_lp = csum[last] - csum[first - 1]  # sum over the predictions of bytes first..last (same row)
        t_lp = tt.logp.to(dev)
        if self.c.alm_debias:
            V = logits.shape[-1] // 2
            lp = torch.log_softmax(logits.float(), -1).reshape(B * T, 2 * V)
            cols = [i + k * V for i in STUDENT_SPACE_IDS for k in (0, 1)]
            s_lp = s_lp + torch.logsumexp(lp[:, cols], -1)[last]  # the next symbol is a space / EOS
            t_lp = t_lp + tt.space.to(dev)
        n = ok.sum()
        loss = alm_chunk_loss(
            t_lp.unsqueeze(0),
            s_lp.unsqueeze(0),
            ok.unsqueeze(0),
            self.c.alm_tau,
            num_valid=shared_count(n).clamp(min=1e-6),
        )
        return loss, n


def word_targets(
    tt: TokenTargets, ids: torch.Tensor, doc_ids: torch.Tensor | None, max_word_bytes: int
) -> tuple[TokenTargets, torch.Tensor]:
    """Token targets moved to word patches (the HAT-word ablation): each word's last byte gets the states of
    the last teacher token that ends inside the word (docs/design.md#latent-alignment: bytelm's word-level
    adaptation of Bolmo's latent alignment); words with no token ending inside them get none. Also returns
    the (B, T) bool word ends the model's own ``segment`` makes (byte t ends a word when t+1 starts one), the
    ``patch_end`` of stage 1: training must use the patches that evaluation uses."""
    from bytelm.models.hierarchical import split_word_starts

    B, T = ids.shape
    a = ids.cpu().numpy()
    d = doc_ids.cpu().numpy() if doc_ids is not None else [None] * B
    ends = []
    word_ends = torch.zeros(B, T, dtype=torch.bool)
    for r in range(B):
        ws = split_word_starts(a[r], max_word_bytes, d[r])
        word_ends[r, :-1] = torch.from_numpy(ws[1:].astype(bool))
        e = [int(x) - 1 for x in ws.nonzero()[0][1:]] + [T - 1]
        ends += [r * T + x for x in e if a[r, x] < 256]
    wend = torch.tensor(ends, dtype=torch.long)
    wstart = torch.cat([torch.zeros(1, dtype=torch.long), wend[:-1] + 1])
    idx = torch.searchsorted(tt.pos, wend, right=True) - 1  # last token ending at or before the word end
    ok = (
        (idx >= 0) & (tt.pos[idx.clamp(min=0)] >= wstart)
        if len(tt.pos)
        else torch.zeros_like(wend, dtype=torch.bool)
    )
    idx, wend = idx[ok], wend[ok]
    return TokenTargets(
        pos=wend,
        first=tt.first[idx],
        ctx=tt.ctx[idx],
        probe=tt.probe[idx],
        exact=tt.exact[idx],
        logp=tt.logp[idx],
        space=tt.space[idx],
        start_ctx=tt.start_ctx,
        start_probe=tt.start_probe,
    ), word_ends


def attach_byteify(module: torch.nn.Module, cfg: Config) -> ByteifyObjective:
    obj = ByteifyObjective(cfg)
    module.extra_loss = obj
    log.info(
        "byteify: stage %d (encoder %.3g x k=%d, alm %.3g, boundary %.3g)",
        cfg.byteify.stage,
        cfg.byteify.encoder_weight,
        cfg.byteify.encoder_blocks,
        cfg.byteify.alm_weight,
        cfg.byteify.boundary_weight,
    )
    return obj


# ---------------------------------------------------------------------------- the byteified ModelSpec's hooks


def load_pretrained(model: torch.nn.Module, cfg: Config, kind: str = "plain") -> None:
    """``ModelSpec.load_pretrained`` of ``byteified``: the source model's blocks, embeddings and vocabulary
    (or a stage-1 run's weights, ``byteify.init_from``), then which parts train (``byteify.train_*``)."""
    load_tensors(model, source_tensors(cfg), kind)
    if cfg.byteify.init_from:
        init_from_checkpoint(model, cfg.byteify.init_from, kind, cfg.byteify.stage)
    set_trainable(model, cfg.byteify)


def param_groups(model: torch.nn.Module, groups: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """``ModelSpec.param_groups`` of ``byteified``: the transplanted backbone learns at its own rate
    (``byteify.backbone_lr_mult``)."""
    from bytelm.lit.module import backbone_lr_groups

    return backbone_lr_groups(model, groups, cfg.optim.lr, cfg.byteify.backbone_lr_mult)
