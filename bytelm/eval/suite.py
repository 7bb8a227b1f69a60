"""The evaluation suite behind ``bytelm-eval`` and ``scripts/report.py``: options, one run, text output, and
the command line that reproduces a result."""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bytelm.eval.multilingual import SPLITS, resolve_split
from bytelm.eval.noise import DEFAULT_LEVELS, KINDS
from bytelm.eval.scoring import Scorer

log = logging.getLogger(__name__)

TASK_NAMES = ("bpb", "multilingual", "robustness", "cute")


@dataclass
class EvalOptions:
    tasks: tuple[str, ...] = TASK_NAMES
    max_bytes: int = 65536  # per evaluated set (English, each language, each noise condition); 0 = all
    seed: int = 0  # noise and task generator
    levels: tuple[float, ...] = DEFAULT_LEVELS
    kinds: tuple[str, ...] = KINDS
    cute_items: int = 50  # items per CUTE task
    cute_shots: int = 3
    languages: tuple[str, ...] = field(default_factory=tuple)  # empty = every language
    ml_split: str = (
        "auto"  # chatterbot dialogs: validation | all | auto (validation if the model trained on them)
    )

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if bad:
            raise ValueError(f"unknown tasks {bad}; choose from {','.join(TASK_NAMES)}")
        if self.ml_split not in SPLITS:
            raise ValueError(f"unknown multilingual split {self.ml_split!r}; choose from {','.join(SPLITS)}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown noise kinds {bad}; choose from {','.join(KINDS)}")

    def cli_args(self) -> list[str]:
        """The ``bytelm-eval`` flags that give these options (defaults left out)."""
        d = EvalOptions()
        args = ["--tasks", ",".join(self.tasks), "--max-bytes", str(self.max_bytes)]
        if self.seed != d.seed:
            args += ["--seed", str(self.seed)]
        if tuple(self.levels) != d.levels:
            args += ["--noise-levels", ",".join(f"{x:g}" for x in self.levels)]
        if tuple(self.kinds) != d.kinds:
            args += ["--noise-kinds", ",".join(self.kinds)]
        if self.cute_items != d.cute_items:
            args += ["--cute-items", str(self.cute_items)]
        if self.cute_shots != d.cute_shots:
            args += ["--cute-shots", str(self.cute_shots)]
        if self.languages:
            args += ["--languages", ",".join(self.languages)]
        if "multilingual" in self.tasks and self.ml_split != d.ml_split:
            args += ["--multilingual-split", self.ml_split]
        return args


def reproduce_command(spec: str, opts: EvalOptions, extra: list[str] | None = None) -> str:
    return shlex.join(["bytelm-eval", str(spec), *opts.cli_args(), *(extra or []), "--json"])


def run_suite(scorer: Scorer, opts: EvalOptions, progress: bool = False) -> dict[str, Any]:
    """Every task of ``opts.tasks`` on one model. Keys: model, options, seconds, and one per task."""
    from bytelm.eval import bpb as B

    res: dict[str, Any] = {"model": scorer.describe(), "options": asdict(opts), "seconds": {}}
    for task in opts.tasks:
        t0 = time.perf_counter()
        log.info("%s: %s", scorer.name, task)
        if task == "bpb":
            res["bpb"] = B.eval_english(scorer, opts.max_bytes, progress)
        elif task == "multilingual":
            split = resolve_split(opts.ml_split, [getattr(scorer, "cfg", None)])
            res["multilingual"] = B.eval_multilingual(
                scorer, opts.max_bytes, opts.languages or None, progress, split
            )
        elif task == "robustness":
            res["robustness"] = B.eval_robustness(
                scorer, opts.max_bytes, opts.kinds, opts.levels, opts.seed, progress
            )
        elif task == "cute":
            from bytelm.eval.cute import generate_suite, score_items

            items = generate_suite(n_per_task=opts.cute_items, seed=opts.seed, shots=opts.cute_shots)
            res["cute"] = score_items(scorer, items)
        res["seconds"][task] = time.perf_counter() - t0
    return res


def format_text(res: dict[str, Any]) -> str:
    """Human-readable summary of ``run_suite``'s result."""
    m = res["model"]
    lines = [f"{m['name']} ({m['kind']}, {m['params']:,} parameters)"]
    if "bpb" in res:
        e = res["bpb"]
        s = (
            f"  held-out English: {e['bpb']:.4f} bpb over {e['bytes']:,} bytes, "
            f"{e['bytes_per_s']:,.0f} bytes/s"
        )
        if "bytes_per_word" in e:
            s += f", {e['bytes_per_word']:.2f} bytes/word"
        if "kept_ratio" in e:
            s += f", kept ratio {e['kept_ratio']:.3f}"
        lines.append(s)
    if "multilingual" in res:
        ml = res["multilingual"]
        lines.append(
            f"  multilingual ({ml['split']} dialogs): pooled {ml['pooled_bpb']:.4f} bpb, mean over "
            f"{len(ml['languages'])} languages {ml['macro_bpb']:.4f} ({ml['bytes']:,} bytes)"
        )

        def num(x: float | None) -> str:
            return "       —" if x is None else f"{x:8.4f}"

        lines += [
            f"    {lang:<20}{num(v['bpb'])}  ({v['bytes']:,} bytes)" for lang, v in ml["languages"].items()
        ]
        lines += [f"    script {k:<13}{num(v)}" for k, v in ml["scripts"].items()]
    if "robustness" in res:
        r = res["robustness"]
        lines.append(
            f"  robustness: clean {r['clean_bpb']:.4f} bpb; mean degradation {r['mean_delta']:+.4f} "
            f"({100 * r['mean_rel']:+.1f}%)"
        )
        lines += [
            f"    {k:<14}{v['bpb']:8.4f}  {v['delta']:+.4f}  ({100 * v['rel']:+.1f}%)"
            for k, v in r["conditions"].items()
        ]
    if "cute" in res:
        c = res["cute"]
        lines.append(
            f"  CUTE-style tasks: acc {c['acc']:.3f}, acc_norm {c['acc_norm']:.3f} (chance {c['chance']:.3f})"
        )
        lines += [
            f"    {t:<10}acc {v['acc']:.3f}  acc_norm {v['acc_norm']:.3f}  (n={v['n']})"
            for t, v in c["tasks"].items()
        ]
    return "\n".join(lines)
