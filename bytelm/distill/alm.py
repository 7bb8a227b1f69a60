"""Approximate Likelihood Matching (ALM) loss, exactly as docs/design.md#alm states it.

ALM ("Cross-Tokenizer Distillation via Approximate Likelihood Matching", Minixhofer et al.; reference
bminixhofer/tokenkit) needs no shared vocabulary: it only compares the likelihood that teacher and student
give to the same chunk of bytes. Each chunk log-likelihood is binarised at temperature ``tau`` into a
Bernoulli "this chunk / not this chunk" and the student is trained with the binary cross-entropy against the
teacher:

    lt = logp_t / tau - eps,   ls = logp_s / tau - eps,   eps = 1e-6
    loss_chunk = -(exp(lt) * ls + (1 - exp(lt)) * log1mexp(ls))

``eps`` keeps ``log1mexp`` finite for chunks of probability 1. The minimum over ``ls`` is at ``ls = lt`` (the
derivative ``-p_t + (1 - p_t) e^ls / (1 - e^ls)`` vanishes exactly there). Every valid chunk weighs 1 and the
sum is divided by the number of valid chunks of the *global* batch (pass ``num_valid`` after an all-reduce).

Student conventions (bytelm's byte vocabulary, ``bytelm.data.bytes``): the student input is ``[BOS] + bytes``,
so row ``j`` of the logits predicts byte ``j`` of the text. For likelihoods we use ``log_softmax`` over the
first ``VOCAB_SIZE`` (259) columns: the model's real distribution (256 bytes + PAD/BOS/EOS); the padded
columns up to 320 are not part of it. The "next unit starts a new word" probability of the student is the mass
of space, newline, tab and EOS.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from bytelm.data.bytes import EOS_ID, VOCAB_SIZE
from bytelm.distill.align import ChunkAlignment, chunk_sum, merge_chunks_by_space_prob
from bytelm.distill.teacher import SPACE_BYTES, TeacherOutput

EPS = 1e-6
DEFAULT_TAU = 100.0  # tokenkit's binarization_temp
DEFAULT_THRESHOLD = 0.1  # tokenkit's tokenizer_pair_bias_threshold for byte students
STUDENT_SPACE_IDS = (*SPACE_BYTES, EOS_ID)

AlmMode = Literal["unconstrained", "append_space", "debiased"]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable everywhere (Mächler 2012).

    Near 0 ``log(-expm1(x))`` keeps the precision of the tiny ``1 - e^x``; for very negative x
    ``log1p(-exp(x))`` does. ``x = 0`` gives ``-inf`` as the math says (the ALM caller keeps ``x <= -eps``);
    the branch not taken is computed on clamped inputs so that no nan/inf leaks into the gradient.
    """
    log_half = -math.log(2.0)
    near = x > log_half
    x_near = torch.where(near, x, torch.full_like(x, log_half))  # in (log 1/2, 0]
    x_far = torch.where(near, torch.full_like(x, log_half), x)  # <= log 1/2
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def binary_ce(
    logp_t: torch.Tensor, logp_s: torch.Tensor, tau: float = DEFAULT_TAU, eps: float = EPS
) -> torch.Tensor:
    """Elementwise binarised cross-entropy of chunk log-likelihoods (same shape in and out, computed in
    fp32)."""
    lt = logp_t.float() / tau - eps
    ls = logp_s.float() / tau - eps
    return -(lt.exp() * ls + (-torch.expm1(lt)) * log1mexp(ls))


def alm_chunk_loss(
    logp_t: torch.Tensor,
    logp_s: torch.Tensor,
    valid: torch.Tensor,
    tau: float = DEFAULT_TAU,
    num_valid: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """ALM from chunk log-likelihoods: logp_t, logp_s, valid (B, C) -> scalar.

    Both log-likelihoods are clamped at <= 0 (sums of log-probs can round above 0). ``num_valid`` is the
    number of valid chunks in the global batch; by default this batch's count (at least 1).
    """
    lt = logp_t.clamp(max=0.0).detach()
    ls = logp_s.clamp(max=0.0)
    zero = torch.zeros_like(ls)
    per = binary_ce(torch.where(valid, lt, zero), torch.where(valid, ls, zero - 1.0), tau)  # (B, C)
    per = torch.where(valid, per, zero)
    denom = valid.sum().clamp(min=1) if num_valid is None else num_valid
    return per.sum() / denom


def student_target_logprobs(logits: torch.Tensor, byte_ids: torch.Tensor) -> torch.Tensor:
    """log p_student(byte j) from logits (B, T, V>=259) whose row j predicts byte j; byte_ids (B, N), N <= T.

    Returns (B, N) fp32, normalised over the 259 real columns; ids outside 0..258 give 0 (padding bytes are
    outside every chunk, so the alignment drops them anyway).
    """
    N = byte_ids.shape[1]
    logp = torch.log_softmax(logits[:, :N, :VOCAB_SIZE].float(), dim=-1)  # (B, N, 259)
    ids = byte_ids.clamp(0, VOCAB_SIZE - 1)
    out = logp.gather(-1, ids[..., None]).squeeze(-1)  # (B, N)
    return torch.where((byte_ids >= 0) & (byte_ids < VOCAB_SIZE), out, torch.zeros_like(out))


def student_space_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log P_student(next byte is space/newline/tab or EOS) per row: (B, T, V) -> (B, T) fp32."""
    logp = torch.log_softmax(logits[..., :VOCAB_SIZE].float(), dim=-1)  # (B, T, 259)
    ids = torch.tensor(STUDENT_SPACE_IDS, device=logits.device)
    return torch.logsumexp(logp.index_select(-1, ids), dim=-1).clamp(max=0.0)


def alm_loss(
    teacher: TeacherOutput,
    alignment: ChunkAlignment,
    student_logits: torch.Tensor,
    byte_ids: torch.Tensor,
    mode: AlmMode = "debiased",
    tau: float = DEFAULT_TAU,
    threshold: float = DEFAULT_THRESHOLD,
    num_valid: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALM between a teacher and a byte student on the same texts.

    teacher: ``Teacher.forward`` output; alignment: ``align_chunks`` on its spans (same device as the logits);
    student_logits (B, T, V) with row j predicting byte j; byte_ids (B, N) the text bytes (N = width of
    ``alignment.byte_chunk``). mode: ``unconstrained`` (smallest chunks, no debiasing), ``append_space`` (add
    log P(next starts a word) at each chunk end, for teacher and student), ``debiased`` (tokenkit's
    ``merge_by_space_prob+append_space``: merge chunks until that teacher probability exceeds ``threshold``,
    then append). Chunk ends whose student row does not exist (end >= T) are invalid in the debiasing modes.
    Returns (loss, stats) with stats = number of valid chunks and mean chunk length in bytes.
    """
    alignment = alignment.to(student_logits.device)  # no-op when already there
    C = alignment.num_chunks
    t_tok = torch.where(
        teacher.logprob_mask, teacher.token_logprobs, torch.zeros_like(teacher.token_logprobs)
    )
    t_chunk = chunk_sum(t_tok, alignment.token_chunk, C).clamp(max=0.0)  # (B, C)
    s_byte = student_target_logprobs(student_logits, byte_ids)  # (B, N)
    s_chunk = chunk_sum(s_byte, alignment.byte_chunk, C).clamp(max=0.0)  # (B, C)
    valid = alignment.chunk_valid  # (B, C)
    exists = alignment.chunk_end > alignment.chunk_start  # (B, C)
    ends = alignment.chunk_end  # (B, C) byte after each chunk = student row that scores it
    lengths = (alignment.chunk_end - alignment.chunk_start).float()
    if mode != "unconstrained":
        T = student_logits.shape[1]
        s_space_rows = student_space_logprobs(student_logits)  # (B, T)
        s_space = s_space_rows.gather(1, ends.clamp(max=T - 1))  # (B, C)
        t_space = teacher.next_space_logprobs.gather(1, alignment.chunk_last_token)  # (B, C)
        valid = valid & (ends < T)
        if mode == "debiased":
            merged = merge_chunks_by_space_prob(t_space, exists, valid, threshold)
            G = merged.last.shape[1]
            t_chunk = chunk_sum(t_chunk, merged.group, G)  # (B, G)
            s_chunk = chunk_sum(s_chunk, merged.group, G)
            lengths = chunk_sum(lengths, merged.group, G)
            t_space = t_space.gather(1, merged.last)
            s_space = s_space.gather(1, merged.last)
            valid = merged.valid
        elif mode != "append_space":
            raise ValueError(f"unknown ALM mode {mode!r}")
        t_chunk = t_chunk + t_space
        s_chunk = s_chunk + s_space
    loss = alm_chunk_loss(t_chunk, s_chunk, valid, tau, num_valid)
    n_valid = valid.sum()
    stats = {
        "alm_chunks": n_valid.detach().float(),
        "alm_chunk_bytes": (lengths * valid).sum().detach() / n_valid.clamp(min=1),
    }
    return loss, stats
