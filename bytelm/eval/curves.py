"""Training curves of a run, read back from its folder: validation bpb against training FLOPs and wall-clock.

The CSV logger (``logger=csv``) writes ``<out_dir>/csv/version_*/metrics.csv`` (a resumed run adds a version;
later versions win for the same step). From it:

- ``val/bpb`` at each validation step;
- training FLOPs at step ``s`` = ``s * bytes_per_step * flops_per_byte`` with ``bytes_per_step`` =
  ``batch_size * seq_len * accumulate * world`` and ``bytelm.models.flops.flops_per_byte`` (for the
  hierarchical model with the bytes per word logged in training, else measured at evaluation, else 4.5). For
  an architecture the formula does not cover (MrT5), ``6 * non-embedding parameters`` per byte, flagged
  ``flops_exact=False``;
- the run's total steps: the checkpoint's ``global_step`` (the CSV's last logged step can be earlier: a run of
  209 steps that logs every 10 has its last row at step 199);
- wall-clock of training at step ``s``: the sum of per-step times, each carried forward over the unlogged
  steps until the next log. Per-step times come from Lightning's ``ThroughputMonitor`` (``train/time``, the
  training seconds so far: its increase between two logged steps over their distance) or, in logs written
  before bytelm used it, from ``perf/step_s`` / ``perf/bytes_per_s``. Validation and checkpointing time are
  not included (they are not training).

``run_training_flops(run)`` is the same rule for a finished run: the main table's "train FLOPs" and the
equal-FLOPs budget that ``scripts/demo.py`` (and so ``scripts/make_results.sh``) gives the flat baseline.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)  # validation steps
    bpb: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)  # training FLOPs spent at each step
    wall_s: list[float] = field(
        default_factory=list
    )  # estimated training seconds at each step ([] = unknown)
    flops_per_byte: float = 0.0
    flops_exact: bool = True
    total_steps: int = 0
    total_flops: float = 0.0
    total_wall_s: float | None = None
    source: str = ""  # the CSV files read, or why there is no curve


def run_dir_of(path: str | Path) -> Path:
    """The run folder of a checkpoint (``<run>/checkpoints/x.ckpt`` -> ``<run>``) or of a run folder
    itself."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    return p.parent if p.name == "checkpoints" else p


def _version(p: Path) -> int:
    m = re.search(r"version_(\d+)", str(p))
    return int(m.group(1)) if m else -1


def read_metrics(run_dir: Path) -> tuple[dict[int, dict[str, float]], list[Path]]:
    """``{step: {metric: value}}`` merged over every ``csv/version_*/metrics.csv`` (later versions win)."""
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=_version)
    rows: dict[int, dict[str, float]] = {}
    for f in files:
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                try:
                    step = int(float(r.get("step") or "nan"))
                except ValueError:
                    continue
                vals = rows.setdefault(step, {})
                for k, v in r.items():
                    if k in ("step", "epoch") or v in (None, ""):
                        continue
                    with contextlib.suppress(ValueError):
                        vals[k] = float(v)
    return rows, files


def _world(cfg: Any) -> int:
    dev = cfg.trainer.devices
    n = dev if isinstance(dev, int) and dev > 0 else len(dev) if isinstance(dev, list | tuple) else 1
    return max(1, n) * max(1, int(cfg.trainer.num_nodes))


def _flops_per_byte(cfg: Any, model: Any, bytes_per_word: float | None) -> tuple[float, bool]:
    try:
        from bytelm.models.flops import flops_per_byte
        from bytelm.models.registry import get_spec

        if bytes_per_word and get_spec(cfg.model.arch).flops_per_word:
            return float(flops_per_byte(cfg.model, cfg.data.seq_len, bytes_per_word)), True
        return float(flops_per_byte(cfg.model, cfg.data.seq_len)), True
    except (ImportError, ValueError) as e:
        log.info(
            "flops_per_byte unavailable for %s (%s): using 6 * non-embedding parameters", cfg.model.arch, e
        )
    n = 0
    if model is not None:
        import torch

        emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in emb)
    return 6.0 * n, False


def checkpoint_file(spec: str | Path) -> Path | None:
    """The Lightning checkpoint a checkpoint path or run folder names (None for anything else, e.g. an
    exported folder or a sharded checkpoint)."""
    p = Path(spec)
    if p.is_file():
        return p if p.suffix == ".ckpt" else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    from bytelm.eval.scoring import resolve_checkpoint

    try:
        ck = resolve_checkpoint(p)
    except FileNotFoundError:
        return None
    return ck if ck.is_file() else None


def checkpoint_step(spec: str | Path) -> int | None:
    """``global_step`` of a bytelm Lightning checkpoint (file or run folder); None when it has none."""
    ck = checkpoint_file(spec)
    if ck is None:
        return None
    import torch

    try:
        step = torch.load(ck, map_location="cpu", weights_only=False, mmap=True).get("global_step")
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint only loses the step count
        log.warning("cannot read the global step of %s: %s", ck, e)
        return None
    return None if step is None else int(step)


def run_training_flops(run: str | Path) -> float:
    """Training FLOPs that a finished run (checkpoint or run folder, trained with ``logger=csv``) spent: its
    steps times bytes per step times ``flops_per_byte`` with the bytes per word logged in training, i.e. the
    main table's "train FLOPs". The equal-FLOPs comparisons give the flat baseline this as its
    ``trainer.flops_budget``. Raises ValueError for an architecture without an exact formula."""
    from bytelm.checkpoint import config_of, read_checkpoint

    ck = checkpoint_file(run)
    if ck is None:
        raise FileNotFoundError(f"no Lightning checkpoint in {str(run)!r}")
    cfg = config_of(read_checkpoint(ck))
    curve = training_curve(ck, cfg)
    if not curve.flops_exact:
        raise ValueError(f"no exact FLOPs formula for model.arch={cfg.model.arch!r}")
    from bytelm.models.registry import get_spec

    if get_spec(cfg.model.arch).flops_per_word and not any(
        True for _ in run_dir_of(ck).glob("csv/version_*/metrics.csv")
    ):
        log.warning("%s has no CSV log: FLOPs counted at the default bytes per word", run)
    return curve.total_flops


def training_curve(
    ckpt_path: str | Path,
    cfg: Any,
    model: Any = None,
    bytes_per_word: float | None = None,
    global_step: int | None = None,
) -> Curve:
    """The run's validation curve against FLOPs and wall-clock (empty ``steps`` when it has no CSV log).
    ``global_step`` (default: read from the checkpoint) is the run's total steps."""
    run_dir = run_dir_of(ckpt_path)
    if global_step is None:
        global_step = checkpoint_step(ckpt_path)
    rows, files = read_metrics(run_dir)
    logged_bpw = [v["train/bytes_per_word"] for v in rows.values() if "train/bytes_per_word" in v]
    bpw = sum(logged_bpw) / len(logged_bpw) if logged_bpw else bytes_per_word
    fpb, exact = _flops_per_byte(cfg, model, bpw)
    t = cfg.trainer
    per_step_bytes = cfg.data.batch_size * cfg.data.seq_len * max(1, t.accumulate) * _world(cfg)
    curve = Curve(flops_per_byte=fpb, flops_exact=exact, source=", ".join(str(f) for f in files))
    last = max(rows) if rows else 0
    curve.total_steps = global_step if global_step is not None else (last + 1 if rows else 0)  # CSV from 0
    curve.total_flops = fpb * per_step_bytes * curve.total_steps
    if not files:
        curve.source = f"no CSV log under {run_dir}/csv (train with logger=csv for curves)"
        return curve
    # wall-clock: per-step seconds from the latest logged
    # value, carried forward (back-filled before the first)
    acc = max(1, t.accumulate)

    from_time = _seconds_from_train_time(rows)

    def step_seconds(v: dict[str, float], s: int | None = None) -> float | None:
        if s is not None and s in from_time:
            return from_time[s]
        if v.get("perf/step_s"):
            return v["perf/step_s"] * acc
        if v.get("perf/bytes_per_s"):
            return per_step_bytes / v["perf/bytes_per_s"]
        return None

    logged = [
        x for x in (step_seconds(rows[k], k) for k in sorted(rows)) if x is not None and math.isfinite(x)
    ]
    have_time = bool(logged)
    elapsed: dict[int, float] = {}
    t_sum, cur = 0.0, (logged[0] if logged else 0.0)
    for s in range(0, last + 1):
        got = step_seconds(rows.get(s, {}), s)
        if got is not None and math.isfinite(got):
            cur = got
        t_sum += cur
        elapsed[s] = t_sum
    for s in sorted(rows):
        if "val/bpb" in rows[s]:
            curve.steps.append(s)
            curve.bpb.append(rows[s]["val/bpb"])
            # validation runs after step s's optimizer update: s + 1 steps of training are done
            curve.flops.append(fpb * per_step_bytes * (s + 1))
            if have_time:
                curve.wall_s.append(elapsed[s])
    curve.total_wall_s = elapsed.get(last) if have_time else None
    return curve


def _seconds_from_train_time(rows: dict[int, dict[str, float]]) -> dict[int, float]:
    """Seconds per optimizer step at each logged step from Lightning's cumulative ``train/time``: its increase
    since the previous logged step over the steps between them (a resumed run restarts the clock: the first
    value after a drop has no predecessor and is skipped)."""
    out: dict[int, float] = {}
    prev: tuple[int, float] | None = None
    for s in sorted(rows):
        t = rows[s].get("train/time")
        if t is None or not math.isfinite(t):
            continue
        if prev is not None and s > prev[0] and t > prev[1]:
            out[s] = (t - prev[1]) / (s - prev[0])
        prev = (s, t)
    return out
