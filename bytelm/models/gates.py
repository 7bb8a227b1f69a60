"""MrT5 delete gate, hard deletion by gather, and the PI controller that sets the gate regulariser.

Formulas (docs/design.md#mrt5-delete-gate, after "MrT5: Dynamic Token Merging for Efficient Byte-level
Language Models"):

- gate: ``G = k * sigmoid(-(RMSNorm(h) @ w + b))`` with ``k = -30``, ``w`` xavier, ``b = +1``, so ``G`` lies
  in ``(k, 0)``: near 0 keeps a position, near ``k`` deletes it. At init ``G`` is near
  ``-30 * sigmoid(-1) = -8.1`` (keep side), but ``RMSNorm(h) @ w`` has a spread of about ``sqrt(2)`` under
  xavier, so a measurable share of positions already falls below ``tau_del`` at init: about a quarter on
  isotropic inputs, 5-50% (by seed and text) inside a freshly initialised MrT5. Padding positions are forced
  to ``k``.
- soft deletion (training): ``G`` is an additive per-key bias on attention scores;
- hard deletion (inference): keep positions with ``G > tau_del`` and compact them (:func:`hard_delete`);
- regulariser ``alpha * mean(G)`` over real positions, with ``alpha`` from :class:`PIController`.

Two options for training from scratch (docs/mrt5.md; both off by default = the paper's gate):

- ``center=True``: the gate reads ``h - mean_t(h)`` (mean over the row's real positions) instead of ``h``.
  A freshly trained residual stream is dominated by a component shared by every position, so a random ``w``
  gives every byte nearly the same ``G`` and the deletion ratio jumps between 0 and 1 as their common level
  crosses ``tau_del``; the regulariser's gradient also rotates that shared component onto ``-w`` (all gates
  fall together). Centering removes the shared part: ``RMSNorm(h - mean) @ w`` has a spread of about
  ``|w|`` within every row, so the ratio is a smooth function of ``b`` and the controller can hold it.
- ``PIController(alpha_min < 0)``: a two-sided controller; the paper's ``alpha >= 0`` can only push toward
  deletion, so an overshoot is undone only by the task loss (weak when the encoder is barely needed).

Mask convention: every ``pad_mask`` here is True where the position holds a real byte (False = padding),
the same convention as ``attend``'s ``key_mask``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bytelm.models.layers import RMSNorm


class DeleteGate(nn.Module):
    """``G = k * sigmoid(-(RMSNorm(h) @ w + b))``; (B, T, D) -> (B, T), padding forced to ``k``."""

    def __init__(self, dim: int, k: float = -30.0, bias_init: float = 1.0, center: bool = False) -> None:
        super().__init__()
        if k >= 0:
            raise ValueError(f"gate scale k must be negative (got {k})")
        self.k = k
        self.bias_init = bias_init
        self.center = center
        self.norm = RMSNorm(dim)
        self.proj = nn.Linear(dim, 1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.constant_(self.proj.bias, self.bias_init)

    def scores(self, h: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pre-sigmoid logit ``RMSNorm(h) @ w + b`` (``h`` centred over the row's real positions when
        ``center``): (B, T, D) -> (B, T)."""
        if self.center:
            if pad_mask is None:
                h = h - h.mean(dim=1, keepdim=True)
            else:
                m = pad_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
                h = h - (h * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.proj(self.norm(h)).squeeze(-1)

    def forward(self, h: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        g = self.k * torch.sigmoid(
            -self.scores(h, pad_mask).float()
        )  # (B, T), fp32: it becomes an attention bias
        if pad_mask is not None:
            g = torch.where(pad_mask.bool(), g, torch.full_like(g, self.k))
        return g


def deleted_mask(G: torch.Tensor, tau_del: float, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: real positions the gate deletes (``G < tau_del``)."""
    d = tau_del > G
    return d if pad_mask is None else d & pad_mask.bool()


def hard_delete(
    h: torch.Tensor,  # (B, T, D)
    G: torch.Tensor,  # (B, T)
    tau_del: float,
    pad_mask: torch.Tensor | None = None,  # (B, T) True = real byte
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep real positions with ``G > tau_del``, compacted to the left in their original order.

    Returns ``(h_kept (B, T', D), key_mask (B, T') True = kept, kept_idx (B, T'))`` with ``T'`` the largest
    number of kept positions in a row (at least 1, so no row is ever empty of keys: a row with nothing kept
    gets a single fully masked slot). Slots past a row's count are padding (``key_mask`` False); their
    ``kept_idx`` points at some deleted position and must not be used. One stable sort and one gather, no
    Python loop over rows. ``kept_idx`` holds original positions (use them for RoPE so relative distances
    between kept bytes stay what they were before compaction).
    """
    B, T, D = h.shape
    keep = tau_del < G
    if pad_mask is not None:
        keep = keep & pad_mask.bool()
    counts = keep.sum(dim=1)  # (B,)
    t_new = max(1, int(counts.max())) if B > 0 else 1
    # stable descending sort of the keep flags puts kept positions first, in their original order
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :t_new]  # (B, T')
    h_kept = torch.gather(h, 1, order.unsqueeze(-1).expand(B, t_new, D))  # (B, T', D)
    key_mask = torch.arange(t_new, device=h.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, T')
    return h_kept, key_mask, order


def all_ranks_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks of the default process group (``x`` itself on one process). Plain
    ``torch.distributed``, so the model code stays free of Lightning; works under DDP, ZeRO and FSDP2
    alike."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class PIController(nn.Module):
    """PI controller for the gate regulariser weight ``alpha`` (MrT5).

    Each training step, from that step's deletion ratio ``r``::

        err = delta - r;  p = 0.9 p + 0.1 kp err;  i = i + ki err;  alpha = max(alpha_min, p + i)

    ``alpha_min = 0`` is the paper's controller (the regulariser only ever pushes toward deletion); a negative
    ``alpha_min`` makes it two-sided (a ratio above ``delta`` gives a negative ``alpha`` that rewards
    keeping). The new ``alpha`` is used from the *next* step (the current step's regulariser uses the value
    before the update); everything starts at 0. State lives in fp32 buffers (kept fp32 even if the model is
    cast to bf16), so it is part of ``model.state_dict()`` and checkpoints resume it exactly. Updates are
    tensor ops (no host sync) that replace the buffers with new tensors rather than write into them
    (``current_alpha``).

    Several processes: the models call :meth:`observe`, which sums the deleted and real position counts over
    the ranks of the default process group (one ``all_reduce`` of two numbers, when ``torch.distributed`` is
    initialised with more than one rank) before updating, so ``r`` is the deletion ratio of the *global* batch
    and every rank holds the same state and ``alpha`` under every strategy (DDP broadcasts buffers from rank
    0, ZeRO and FSDP2 do not: the controller must not rely on that). Every rank calls it once per training
    forward, so the collectives match.
    """

    p: torch.Tensor
    i: torch.Tensor
    alpha: torch.Tensor
    steps: torch.Tensor

    def __init__(
        self, target: float = 0.5, kp: float = 0.5, ki: float = 1e-5, alpha_min: float = 0.0
    ) -> None:
        super().__init__()
        self.target, self.kp, self.ki, self.alpha_min = target, kp, ki, alpha_min
        self.register_buffer("p", torch.zeros((), dtype=torch.float32))
        self.register_buffer("i", torch.zeros((), dtype=torch.float32))
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _apply(self, fn: Any, recurse: bool = True) -> PIController:  # type: ignore[override]
        super()._apply(fn, recurse)
        for name in ("p", "i", "alpha"):  # a bf16 cast would swallow the ki-sized increments of i
            buf = self._buffers[name]
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    @torch.no_grad()
    def update(self, deletion_ratio: torch.Tensor | float) -> torch.Tensor:
        """Advance one step with this step's deletion ratio; returns the new ``alpha`` (for the next step)."""
        r = torch.as_tensor(deletion_ratio, dtype=torch.float32, device=self.p.device)
        err = self.target - r
        p = 0.9 * self.p + 0.1 * self.kp * err
        i = self.i + self.ki * err
        # new tensors, not in-place updates: the step's regulariser holds the old alpha for its backward, and
        # a compiled backward may read that buffer again after the forward (see current_alpha)
        new = {"p": p, "i": i, "alpha": torch.clamp(p + i, min=self.alpha_min), "steps": self.steps + 1}
        for name, value in new.items():
            self._buffers[name] = value
        return self.alpha.clone()

    @torch.no_grad()
    def observe(self, G: torch.Tensor, tau_del: float, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Advance one step with the deletion ratio of the global batch: ``G`` (B, T) gate values of this
        rank's batch, ``pad_mask`` (B, T) True = real position. Returns the new ``alpha``."""
        valid = torch.ones_like(G, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        counts = torch.stack(
            [deleted_mask(G, tau_del, valid).sum(), valid.sum()]
        ).float()  # (2,) deleted, real
        counts = all_ranks_sum(counts)
        return self.update(counts[0] / counts[1].clamp(min=1.0))

    def current_alpha(self) -> torch.Tensor:
        """``alpha`` (the value set by the previous step) for this step's regulariser. :meth:`update` replaces
        the buffers with new tensors instead of writing into them, so the tensor returned here keeps its value
        until this step's backward: a compiled backward may read it from the buffer after the forward
        (torch.compile's partitioner recomputes ``alpha.clone()`` from its input, which an in-place update
        would have changed by then; tests/models/test_compile.py)."""
        return self.alpha

    def reset(self) -> None:
        for b in (self.p, self.i, self.alpha, self.steps):
            b.zero_()

    def extra_repr(self) -> str:
        return f"target={self.target}, kp={self.kp}, ki={self.ki}, alpha_min={self.alpha_min}"


@torch.no_grad()
def gate_stats(
    G: torch.Tensor,  # (B, T)
    tau_del: float,
    pad_mask: torch.Tensor | None = None,  # (B, T) True = real byte
    alpha: torch.Tensor | float = 0.0,
) -> dict[str, torch.Tensor]:
    """Gate metrics over real positions (detached tensors, no host sync): ``deletion_ratio`` (fraction with
    ``G < tau_del``), ``alpha``, ``gate_mean`` (mean G), ``bytes_kept_per_seq`` (mean kept count per row),
    ``kept_ratio`` (1 - deletion_ratio)."""
    valid = torch.ones_like(G, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
    n_valid = valid.sum().clamp(min=1).float()
    deleted = deleted_mask(G, tau_del, valid)
    ratio = deleted.sum().float() / n_valid
    kept_per_row = (valid & ~deleted).sum(dim=1).float()  # (B,)
    return {
        "deletion_ratio": ratio,
        "kept_ratio": 1.0 - ratio,
        "alpha": torch.as_tensor(alpha, dtype=torch.float32, device=G.device).detach().clone(),
        "gate_mean": (G.float() * valid).sum() / n_valid,
        "bytes_kept_per_seq": kept_per_row.mean(),
    }


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is True (all positions when None); differentiable."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)
