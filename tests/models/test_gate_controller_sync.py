"""The gate's PI controller sees the deletion ratio of the *global* batch: with different data (and different
amounts of padding) on each of 2 ranks, after N training forwards every rank holds the same controller state,
equal to one process fed the combined batch. Plain gloo process groups (what every strategy's controller call
goes through), each rank a subprocess with a collective timeout, so a mismatch fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
STEPS, ROWS_PER_RANK, T, WORLD = 6, 2, 40, 2
TEXT = (
    b"It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    b"foolishness. "
)


SIZES = {"hier_gate": dict(n_layers=1, d_byte=16, encoder_layers=1), "mrt5": dict(d_byte=16)}  # on TINY


def build(kind: str) -> torch.nn.Module:
    from conftest import tiny_model  # also in the rank subprocesses (tests/ is on their PYTHONPATH)

    from bytelm.models.config import GateConfig

    gate = GateConfig(layer=1, bias_init=0.0, target_ratio=0.6, ki=1e-2, alpha_min=-1.0, center=True)
    return tiny_model(kind, gate=gate, **SIZES[kind]).train()


def global_batch(step: int) -> torch.Tensor:
    """(WORLD * ROWS_PER_RANK, T + 1) rows of text; rank 1's rows end in padding (fewer real positions)."""
    from bytelm.data.bytes import PAD_ID

    g = torch.Generator().manual_seed(step)
    data = torch.tensor(list(TEXT * 4))
    rows = []
    for r in range(WORLD * ROWS_PER_RANK):
        o = int(torch.randint(0, len(TEXT), (1,), generator=g))
        row = data[o : o + T + 1].clone()
        if r >= ROWS_PER_RANK:  # the second rank's rows: a long padded tail
            row[T // 2 + 3 * r :] = PAD_ID
        rows.append(row)
    return torch.stack(rows)


def run_steps(m: torch.nn.Module, rows_of_step) -> dict[str, float]:
    for s in range(STEPS):
        rows = rows_of_step(s)
        m(rows[:, :-1], targets=rows[:, 1:])  # training forward: the controller advances (no optimizer step)
    c = m.controller  # type: ignore[union-attr]
    return {k: float(getattr(c, k)) for k in ("p", "i", "alpha", "steps")}


@pytest.mark.parametrize("kind", ["hier_gate", "mrt5"])
def test_controller_state_is_global_and_identical_on_every_rank(kind, tmp_path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    init = tmp_path / "pg_init"
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), kind, str(tmp_path / f"rank{r}.json"), str(r), str(init)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert got[0] == got[1], got  # the same state on every rank (bit for bit)

    torch.set_num_threads(1)
    single = run_steps(build(kind), global_batch)  # one process, the combined batch
    assert single["steps"] == got[0]["steps"] == STEPS
    for k in ("p", "i", "alpha"):
        assert abs(single[k] - got[0][k]) < 1e-6, (k, single, got[0])
    # and the state is not what one rank alone would reach (the ranks' ratios differ)
    alone = run_steps(build(kind), lambda s: global_batch(s)[ROWS_PER_RANK:])
    assert abs(alone["p"] - single["p"]) > 1e-4, (alone, single)


def _worker(kind: str, out: str, rank: int, init: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        lo = rank * ROWS_PER_RANK
        state = run_steps(build(kind), lambda s: global_batch(s)[lo : lo + ROWS_PER_RANK])
        Path(out).write_text(json.dumps(state))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
