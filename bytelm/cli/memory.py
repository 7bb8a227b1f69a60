"""GPU memory per device for the model states of each strategy (ZeRO paper, Rajbhandari et al. 2020, §3-5).

With mixed precision and Adam, a model of ``P`` parameters needs, summed over all copies:
  2P (bf16 parameters) + 2P (bf16 gradients) + K·P optimizer states, K = 12 (fp32 master weights, Adam m, v).
Each strategy divides some of these by the number of data-parallel devices ``N``:

  ddp / single      2P + 2P + K·P                       = 16P bytes
  deepspeed_zero1   2P + 2P + K·P/N                      (optimizer states sharded)
  deepspeed_zero2   2P + (2 + K)·P/N                     (+ gradients sharded)
  deepspeed_zero3   (2 + 2 + K)·P/N                      (+ parameters sharded)
  fsdp2             (4 + 4 + 8)·P/N                      (fp32 sharded params + grads, Adam m, v: = ZeRO-3)

``offload_optimizer`` moves the K·P term to CPU RAM (ZeRO-Offload: the fp32 gradients too); ``offload_params``
(ZeRO-3 only) moves the parameter shards too. Full-precision training (``32-true``) has fp32 params and grads
and K = 8: the same 16P total. Activations come on top (``activation_bytes``); so do the temporarily gathered
layers of ZeRO-3 / FSDP2 and the framework's buffers, which is why docs/scaling.md adds a margin.
"""

from __future__ import annotations

from dataclasses import dataclass

from bytelm.config import STRATEGIES

GIB = 1024**3


@dataclass(frozen=True)
class ModelStates:
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_states_bytes(
    n_params: float,
    strategy: str,
    n_gpus: int = 1,
    *,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    k: float = 12.0,
) -> ModelStates:
    """Bytes of parameters, gradients and optimizer states on each GPU (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    n = max(1, int(n_gpus)) if strategy not in ("single",) else 1
    P = float(n_params)
    if strategy in ("single", "ddp"):
        s = ModelStates(2 * P, 2 * P, k * P)
    elif strategy == "deepspeed_zero1":
        s = ModelStates(2 * P, 2 * P, k * P / n)
    elif strategy == "deepspeed_zero2":
        s = ModelStates(2 * P, 2 * P / n, k * P / n)
    elif strategy == "deepspeed_zero3":
        s = ModelStates(2 * P / n, 2 * P / n, k * P / n)
    else:  # fsdp2: fp32 sharded parameters and gradients, Adam m and v
        s = ModelStates(4 * P / n, 4 * P / n, 8 * P / n)
    if offload_optimizer and strategy.startswith("deepspeed"):
        s = ModelStates(s.params, s.grads, 0.0)
    if offload_params and strategy == "deepspeed_zero3":
        s = ModelStates(0.0, s.grads, s.optimizer)
    return s


def activation_bytes(
    d_model: int, n_layers: int, tokens_per_gpu: int, *, checkpointing: bool = False, bytes_per_value: int = 2
) -> float:
    """Activation memory of a Llama-style stack with flash/SDPA attention (no T×T scores kept).

    Per layer and token about 17 values of width d are kept for backward (Korthikanti et al. 2022's 34·d bytes
    in 16 bit, without the attention-score term). With activation checkpointing only each layer's input is
    kept, plus one layer's full set while it is recomputed.
    """
    per_layer = 17.0 * d_model * bytes_per_value * tokens_per_gpu
    if checkpointing:
        return n_layers * d_model * bytes_per_value * tokens_per_gpu + per_layer
    return n_layers * per_layer


def memory_table(sizes: dict[str, float], n_gpus: int = 8) -> list[dict[str, object]]:
    """Rows of GiB per GPU for model states: one row per model size, one column per strategy."""
    rows: list[dict[str, object]] = []
    for name, p in sizes.items():
        row: dict[str, object] = {"model": name, "params": p}
        for st in ("ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"):
            row[st] = model_states_bytes(p, st, n_gpus).total / GIB
        row["deepspeed_zero3+offload"] = (
            model_states_bytes(
                p, "deepspeed_zero3", n_gpus, offload_optimizer=True, offload_params=True
            ).total
            / GIB
        )
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, object]], n_gpus: int) -> str:
    cols = ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3+offload"]
    head = "| model | " + " | ".join(c.replace("deepspeed_", "") for c in cols) + " |"
    lines = [
        f"Model states, GiB per GPU, {n_gpus} GPUs, bf16 + Adam:",
        "",
        head,
        "|" + "---|" * (len(cols) + 1),
    ]
    for r in rows:
        vals = " | ".join(f"{float(r[c]):.1f}" for c in cols)  # type: ignore[arg-type]
        lines.append(f"| {r['model']} | {vals} |")
    return "\n".join(lines)


DEFAULT_SIZES = "125M,350M,1.3B,7B,13B,70B"
_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_size(s: str) -> float:
    """``"1.3B"`` -> 1.3e9 (suffix K, M, B/G or T; a plain number is a parameter count)."""
    s = s.strip()
    mult = _UNITS.get(s[-1:].upper(), 1.0)
    try:
        return float(s[:-1] if mult != 1.0 else s) * mult
    except ValueError:
        raise ValueError(f"not a parameter count: {s!r} (e.g. 350M, 1.3B, 7e9)") from None


def main(argv: list[str] | None = None) -> None:
    """``bytelm-memory`` (= ``python -m bytelm.cli.memory``): the model-states table of docs/scaling.md."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="bytelm-memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--gpus", type=int, default=8, help="data-parallel GPUs the states are sharded over (default 8)"
    )
    ap.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"comma-separated parameter counts (default {DEFAULT_SIZES})"
    )
    args = ap.parse_args(argv)
    if args.gpus < 1:
        ap.error("--gpus must be at least 1")
    try:
        sizes = {s.strip(): parse_size(s) for s in args.sizes.split(",") if s.strip()}
    except ValueError as e:
        ap.error(str(e))
    print(format_table(memory_table(sizes, args.gpus), args.gpus))


if __name__ == "__main__":
    main()
