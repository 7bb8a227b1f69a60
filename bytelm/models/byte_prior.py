"""The exact (byte, ends-the-patch) prior of a byteified model, read from the source model's LM head.

With patch k's backbone output ``z``, the source head gives ``p = softmax(head(z))`` over the source's tokens
(the distribution of the token after patch k). For the bytes ``s`` already emitted in the open patch and the
next byte ``c``, with ``M(s)`` the total probability of the tokens whose bytes start with ``s`` and
``M'(s) = M(s) - p(s)`` (the tokens that go on after ``s``)::

    P(c, ends     | s) = p(s + c)                / M'(s)
    P(c, continues | s) = (M(s + c) - p(s + c))  / M'(s)

The 2 x 256 values sum to 1, and over a whole patch the product telescopes to ``p(token)``: with the source
tokenizer's segmentation a byteified model whose decoder adds nothing scores every text exactly as the source
model does (docs/byteify.md, "The fused head and its exact prior"). With a byte-sorted vocabulary each ``M``
is a range of prefix sums, so one LM-head matmul per *patch* (not per byte) serves every byte of the next
patch.

Special tokens of the source (``None`` in the vocabulary table) spell no bytes and are left out of ``p``: the
ratios above renormalise them away. bytelm's own specials (BOS/EOS/PAD) get a small constant log-prior on the
"ends" side (a special is always a patch of its own) and the floor on the "continues" side; the decoder's
residual head learns where documents end.
"""

from __future__ import annotations

import torch

from bytelm.models.vocab_trie import VocabTrie

PRIOR_FLOOR = -30.0  # log-prior of symbols the source calls impossible (keeps every logit finite)
SPECIAL_LOGP = (
    -12.0
)  # log-prior of (BOS/EOS/PAD, ends): ~1e-5 of the mass, so step 0 stays at the source's bpb


def prior_cumsum(trie: VocabTrie, head: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(R, V'+1) fp64 prefix sums of the source head's probabilities in byte order for R context vectors (one
    LM-head matmul per context: per patch, not per byte). The columns are picked after the matmul, which moves
    R x V' numbers instead of the whole V x D head."""
    with torch.no_grad():
        order = trie.order.to(table.device)
        logits = (table.detach().float() @ head.float().t()).index_select(
            1, order
        )  # (R, V') byte-spelled tokens
        p = torch.softmax(logits, -1)
        return torch.nn.functional.pad(p.cumsum(1, dtype=torch.float64), (1, 0))


def fused_from_cumsum(
    trie: VocabTrie,
    cum: torch.Tensor,  # (R, V'+1) from ``prior_cumsum``
    row_of: torch.Tensor,  # (M,) row of ``cum`` each query reads
    nodes: torch.Tensor,  # (M,) trie node of each query's open-patch bytes (0 = empty)
    vocab_size: int,
) -> torch.Tensor:  # (M, 2V) log-probs: [:V] the byte continues its patch, [V:] it ends it
    """The prior of the module docstring from prefix sums, in fp32 (ratios in fp64)."""
    V = vocab_size
    M = row_of.shape[0]
    out = torch.full((M, 2 * V), PRIOR_FLOOR, device=cum.device)
    out[:, V + 256 : V + min(V, 259)] = SPECIAL_LOGP  # (special, ends); padded columns stay at the floor
    if M == 0:
        return out
    with torch.no_grad():
        trie = trie.to(cum.device)
        end, cont, total = trie.fused_masses(cum, row_of, nodes)  # (M, 256) x 2, (M,)
        ok = total > 1e-300
        if not bool(ok.all()):  # no token goes on after s (rounding only: open_nodes restarts): read the root
            e0, c0, t0 = trie.fused_masses(cum, row_of[~ok], torch.zeros_like(nodes[~ok]))
            end[~ok], cont[~ok], total[~ok] = e0, c0, t0
        logz = total.clamp(min=1e-300).log().unsqueeze(-1)  # (M, 1)
        out[:, :256] = (cont.clamp(min=1e-300).log() - logz).float().clamp(min=PRIOR_FLOOR)
        out[:, V : V + 256] = (end.clamp(min=1e-300).log() - logz).float().clamp(min=PRIOR_FLOOR)
    return out


def fused_log_prior(
    trie: VocabTrie,
    head: torch.Tensor,  # (V_src, D) the source LM head
    table: torch.Tensor,  # (R, D) context vectors (backbone outputs after the final norm)
    rows: torch.Tensor,  # (M,) row of ``table`` each query reads
    nodes: torch.Tensor,  # (M,) trie node of each query's open-patch bytes (0 = empty)
    vocab_size: int,  # V of the byte model (256 bytes + specials + padding)
) -> torch.Tensor:  # (M, 2V) log-probs
    """The prior for M queries: one head matmul per context row that a query reads."""
    if rows.shape[0] == 0:
        return fused_from_cumsum(
            trie, torch.zeros(0, 1, dtype=torch.float64, device=table.device), rows, nodes, vocab_size
        )
    used, r_of = torch.unique(rows, return_inverse=True)
    return fused_from_cumsum(trie, prior_cumsum(trie, head, table[used]), r_of, nodes, vocab_size)
