"""Next-byte distributions implied by a subword teacher, and the byte-level KL against a byte student.

``byte_kl_naive`` (docs/design.md#byte-level-teacher-distributions) uses the *naive within-token marginal*. At
byte ``j`` inside teacher token ``t_i`` (which starts at byte ``s``), with the teacher's next-token
distribution ``p`` for position ``i`` and the prefix ``q = bytes[s:j]`` already emitted inside the token:

    P(b) = M(q + b) / sum_b' M(q + b'),      M(x) = sum of p(v) over tokens v whose bytes start with x.

The denominator is often written ``M(q)``, but ``M(q)`` also counts tokens *equal to* ``q`` (the token ends
here), an event the naive marginal never scores, so with ``M(q)`` the 256 probabilities sum to ``1 - P(end)``.
We renormalise over the 256 bytes by default (``renormalize=True``) so that the target is a distribution, i.e.
we condition on "the token goes on", which is true at every position we score. ``renormalize=False`` gives the
literal ``M(q + b) / M(q)``. The estimate is biased either way: it ignores other segmentations of the prefix
and it treats the current token as known to continue.

Structure. Tokens (special tokens excluded; byte-level BPE ``Ġ`` pieces and ``<0xNN>`` byte-fallback tokens
decoded to bytes) are sorted by their bytes, so every prefix's tokens are one contiguous range ``[lo, hi)``.
Trie nodes (all proper prefixes of tokens) keep that range; the children of a node are consecutive node ids.
On the device: sort each used probability row by that order, take prefix sums (fp64 by default: masses of
deep prefixes are small differences of numbers near 1), and read ``M`` of each child as ``cum[hi] - cum[lo]``;
a scatter writes the children's masses into a (M, 256) table. No Python loop runs per byte.

Exact alternative for evaluation (Phan et al., "Exact Byte-Level Probabilities from Tokenized Language
Models"; their reference code is SentencePiece-only): ``exact_byte_logprobs``. If the teacher only gives mass
to canonical tokenizations tau(.), every continuation of ``x = bytes[:n]`` is tokenized as
``tau(x[:i]) + [t] + ...`` where ``t`` is the *cover* token that starts at some ``i <= n`` and runs past
``n``. Hence

    P(next byte = b | x)  ∝  sum_{i <= n} P(tau(x[:i])) * M_i(x[i:n] + b),

with ``P(tau(x[:i]))`` the teacher's probability of the canonical tokenization of the first ``i`` bytes and
``M_i`` the prefix mass (as above) of its next-token distribution; the ``i = n`` term is "the canonical
tokenization times the next-token mass of tokens starting with b". It costs one teacher forward per split
point ``i`` (about one per byte), so it is an evaluation tool, not a training loss. We do not prune covers
that would be non-canonical (the paper's "invalid encodings"; the teacher gives them little mass anyway). A
Hugging Face tokenizer takes text, not bytes, so with a ``Teacher`` a split point inside a UTF-8 character is
used only where the text's own tokenization has a boundary (its tokens so far serve as ``tau(x[:i])``); other
covers starting inside a character are missing. The result is exact under the paper's assumptions for
tokenizers whose canonical tokenization is prefix-consistent (e.g. longest-match), which the tests check by
enumeration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bytelm.distill.teacher import Teacher, TeacherOutput
from bytelm.models.vocab_trie import VocabTrie


class ByteTrie(VocabTrie):
    """``VocabTrie`` (bytelm/models/vocab_trie.py) plus the teacher-side queries used by distillation."""

    @classmethod
    def from_tokenizer(cls, tokenizer: object, vocab_size: int | None = None) -> ByteTrie:
        """Build from a Hugging Face tokenizer (see ``teacher.token_bytes_table`` for the byte decoding)."""
        from bytelm.distill.teacher import token_bytes_table

        return cls(token_bytes_table(tokenizer, vocab_size))

    def teacher_byte_logprobs(
        self, teacher: TeacherOutput, n_student_bytes: int | None = None, renormalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-byte teacher distributions for a batch: (B, N, 256) log-probs and a (B, N) mask.

        Byte j uses the teacher token i that contains it (row i-1 of ``next_logprobs``, so the forward must
        have been run with ``next_logprobs=True``). Bytes in inexact tokens (invalid UTF-8), in the first
        token without a prediction, or past the tokenized text are masked.
        """
        if teacher.next_logprobs is None:
            raise ValueError("run the teacher with next_logprobs=True for byte distributions")
        enc = teacher.encoding
        B, L, V = teacher.next_logprobs.shape
        N = int(n_student_bytes if n_student_bytes is not None else int(enc.n_bytes.max()))
        dev = teacher.next_logprobs.device
        if self.order.device != dev:
            self.to(dev)  # in place, once
        spans = enc.spans.to(dev)
        ends = spans[..., 1].contiguous()  # (B, L) non-decreasing over positions
        j = torch.arange(N, device=dev).expand(B, N).contiguous()  # (B, N)
        pos = torch.searchsorted(ends, j, right=True)  # (B, N) first token ending after byte j
        inside = pos < L
        pos_c = pos.clamp(max=L - 1)
        tok = enc.input_ids.to(dev).gather(1, pos_c)  # (B, N)
        tok_end = ends.gather(1, pos_c)
        tok_len = self.token_len[tok.clamp(max=self.vocab_size - 1)]
        depth = tok_len - (tok_end - j)  # handles a dummy-prefix space (token one byte longer than its span)
        mask = (
            inside
            & (pos_c >= 1)
            & enc.exact_mask.to(dev).gather(1, pos_c)
            & (j < enc.n_bytes.to(dev)[:, None])
            & (depth >= 0)
            & (depth < tok_len)
        )
        flat = mask.nonzero(as_tuple=True)
        nodes = self.token_nodes[self.token_ptr[tok[flat]] + depth[flat]]
        rows = flat[0] * L + (pos_c[flat] - 1)  # row i-1 predicts token i
        lp = self.byte_logprobs(teacher.next_logprobs.reshape(B * L, V), rows, nodes, renormalize)
        out = torch.zeros(B, N, 256, device=dev)
        out[flat] = lp
        return out, mask


def byte_kl(
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    student_logits: torch.Tensor,
    num_valid: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """KL(teacher bytes || student bytes) averaged over masked positions.

    teacher_logp (B, N, 256), mask (B, N); student_logits (B, T >= N, V) whose row j predicts byte j. The
    student side is ``log_softmax`` over the 256 byte columns only (the teacher's naive marginal has no EOS),
    so both are distributions over the same 256 events. ``num_valid``: global count of positions (default
    local).
    """
    N = teacher_logp.shape[1]
    s = torch.log_softmax(student_logits[:, :N, :256].float(), dim=-1)  # (B, N, 256)
    t = teacher_logp.float()
    pt = t.exp()
    kl = torch.where(pt > 0, pt * (t - s), torch.zeros_like(s)).sum(-1)  # (B, N)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    denom = mask.sum().clamp(min=1) if num_valid is None else num_valid
    return kl.sum() / denom


def byte_kl_naive(
    teacher: TeacherOutput,
    trie: ByteTrie,
    student_logits: torch.Tensor,
    renormalize: bool = True,
    num_valid: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Byte-level KL against the teacher's naive within-token marginal (fast, approximate; module docstring).

    teacher: ``Teacher.forward(..., next_logprobs=True)``; trie on the same device; student_logits (B, T, V)
    with row j predicting byte j of each text (T >= the longest text). Returns a scalar.
    """
    N = min(student_logits.shape[1], int(teacher.encoding.n_bytes.max()))
    t_lp, mask = trie.teacher_byte_logprobs(teacher, N, renormalize)
    return byte_kl(t_lp, mask, student_logits, num_valid)


ScoreFn = Callable[[list[list[int]]], tuple[torch.Tensor, torch.Tensor]]
PrefixFn = Callable[[bytes, int], "list[int] | None"]


def exact_byte_logprobs(
    text: bytes, trie: ByteTrie, prefix_tokens: PrefixFn, score: ScoreFn, batch_size: int = 32
) -> torch.Tensor:
    """Cover-sum next-byte log-probs of one text (module docstring): (N, 256), row n = P(byte n | text[:n]).

    prefix_tokens(text, i) -> canonical token ids of ``text[:i]``, or None to allow no cover starting at i;
    score(list of id lists) -> (log P(sequence) (S,), next-token log-probs after it (S, V)). Split points are
    scored ``batch_size`` at a time and folded into running log-sums (memory O(N * 256)). A row with no cover
    at all is -inf everywhere.
    """
    N = len(text)
    maxlen = int(trie.token_len.max()) if trie.token_len.numel() else 0
    splits = [(i, q) for i in range(N) if (q := prefix_tokens(text, i)) is not None]
    acc = torch.full((N, 256), float("-inf"), dtype=torch.float64)  # running log sum over covers
    for k in range(0, len(splits), batch_size):
        part = splits[k : k + batch_size]
        logw, dists = score([q for _, q in part])  # (S,), (S, V)
        rows, nodes, pos = [], [], []
        for r, (i, _) in enumerate(part):
            for n in range(i, min(N, i + maxlen)):
                node = trie.node_of(text[i:n])
                if node is None:  # no token extends text[i:n]: longer prefixes cannot either
                    break
                rows.append(r)
                nodes.append(node)
                pos.append(n)
        if not rows:
            continue
        dev = dists.device
        rows_t = torch.tensor(rows, device=dev)
        masses, _ = trie.byte_masses(dists, rows_t, torch.tensor(nodes, device=dev))  # (M, 256)
        terms = (masses.log() + logw.to(masses)[rows_t][:, None]).cpu()  # (M, 256)
        pos_t = torch.tensor(pos)
        for n in torch.unique(pos_t).tolist():
            acc[n] = torch.logsumexp(torch.cat([acc[n][None], terms[pos_t == n]]), dim=0)
    total = torch.logsumexp(acc, dim=-1, keepdim=True)  # (N, 1)
    return torch.where(torch.isfinite(total), acc - total, acc).float()


def teacher_prefix_tokens(teacher: Teacher, text: bytes) -> PrefixFn:
    """Canonical prefixes for a Hugging Face teacher: at a token boundary of the text's own tokenization, its
    tokens so far (this also covers boundaries inside a UTF-8 character, which the text-only tokenizer cannot
    tokenize on their own); at any other character start, the tokenization of the prefix; else no cover."""
    full = teacher.tokenize_bytes(text)
    bounds: dict[int, list[int]] = {0: []}
    pos = 0
    for k, v in enumerate(full):
        tb = teacher.table[v] if 0 <= v < len(teacher.table) else None
        if tb is None or not text.startswith(tb, pos):
            break  # invalid UTF-8 or a lossy token: boundaries after it are unknown
        pos += len(tb)
        bounds[pos] = full[: k + 1]

    def prefix(data: bytes, i: int) -> list[int] | None:
        if i in bounds:
            return bounds[i]
        if (data[i] & 0xC0) != 0x80:  # a character start: the tokenizer can take the prefix as text
            return teacher.tokenize_bytes(data[:i])
        return None

    return prefix


def exact_byte_logprobs_teacher(
    teacher: Teacher, trie: ByteTrie, text: bytes, batch_size: int = 32
) -> torch.Tensor:
    """``exact_byte_logprobs`` with a ``Teacher``: its tokenizer and forward (evaluation only, ~1
    forward/byte)."""
    return exact_byte_logprobs(
        text, trie, teacher_prefix_tokens(teacher, text), teacher.score_sequences, batch_size
    )
