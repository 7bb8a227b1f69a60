"""Evaluate a set of bytelm checkpoints (and the SmolLM2 subword teacher as a reference row) and write
``docs/results.md`` with tables and PNG plots under ``docs/img/``.

  python scripts/report.py --run flat=runs/demo/flat_tiny --run hierarchical=runs/demo/hat_tiny \\
      --teacher --max-bytes 65536 --out docs/results.md

Per run: every task of ``bytelm-eval`` (held-out English bpb, bytes/s, bytes per word / kept ratio, robustness
to noise, CUTE-style tasks), and its training curve read from the run folder's CSV log (validation bpb vs
training FLOPs and vs wall-clock). Speed ratios come from ``out/bench_*.json`` when the benchmark scripts have
written them. Each row's ``bytelm-eval`` command is printed and written next to it.

Multilingual bpb is reported only for models that trained on the languages: a byte model trained on English
alone has learned to rule out the bytes of other scripts and scores far above 8 bpb on them, which says
nothing about its architecture. ``--multilingual-run NAME=SPEC`` names the model that stands in row NAME's
multilingual numbers (the same experiment trained with ``data=mixture``: ``scripts/make_results.sh`` trains
one per row); a run that itself trained on the dialogs is scored on them; the teacher is a pretrained
reference. Everything scored on the dialogs uses one split (the held-out 10% once any model trained on them).

``--cache DIR`` keeps each evaluation (model file, task, options, evaluation code) in DIR, so regenerating the
page after a formatting change or with one new row re-evaluates only what changed (the teacher row takes
minutes on CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from bytelm.cli.eval import csv_list
from bytelm.eval import plots
from bytelm.eval.curves import Curve, checkpoint_file, training_curve
from bytelm.eval.multilingual import SPLITS, resolve_split, trained_on_chatterbot
from bytelm.eval.scoring import ByteScorer, Scorer, load_scorer
from bytelm.eval.suite import TASK_NAMES, EvalOptions, reproduce_command, run_suite

log = logging.getLogger("report")


def parse_run(s: str) -> tuple[str, str]:
    if "=" in s:
        name, spec = s.split("=", 1)
        return name.strip(), spec.strip()
    p = Path(s)
    return (p.parent.parent.name if p.is_file() else p.name), s


def train_command(spec: str) -> str | None:
    """The command that trained a run, from its folder: Hydra's ``hydra/.hydra/overrides.yaml`` (written by
    ``python -m bytelm.train``) or a ``command.txt`` (written by scripts/demo.py); None if neither is
    there."""
    import yaml

    p = Path(spec)
    for d in (p, p.parent, p.parent.parent):
        ov = d / "hydra" / ".hydra" / "overrides.yaml"
        if ov.is_file():
            try:
                items = [str(x) for x in (yaml.safe_load(ov.read_text()) or [])]
            except (OSError, yaml.YAMLError) as e:
                log.warning("cannot read %s: %s", ov, e)
                return None
            cwd = str(Path.cwd()) + os.sep
            return shlex.join(["python", "-m", "bytelm.train", *(x.replace(cwd, "") for x in items)])
        cmd = d / "command.txt"
        if cmd.is_file():
            return cmd.read_text().strip()
    return None


def f4(x: Any) -> str:
    return "—" if x is None else f"{x:.4f}"


def human(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}{unit}"
    return f"{x:.3g}{unit}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


# ------------------------------------------------------------------------------------------- evaluation cache
EVAL_DIR = Path(__file__).resolve().parent.parent / "bytelm" / "eval"


def model_identity(spec: str) -> Any:
    """What a cached evaluation of ``spec`` is valid for: its checkpoint file (path, size, mtime) or, for an
    exported folder, its files; a name such as ``teacher`` (a pinned package) stands for itself."""
    p = Path(spec)
    if not p.exists():
        return spec
    ck = checkpoint_file(p)
    files = (
        [ck] if ck is not None else ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()))
    )
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


SCORING_CODE = (
    "bpb.py",
    "cute.py",
    "multilingual.py",
    "noise.py",
    "scoring.py",
    "suite.py",
)  # not curves/plots


def eval_code_hash() -> str:
    h = hashlib.sha256()
    for name in SCORING_CODE:
        h.update(name.encode() + (EVAL_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def evaluate(
    scorer: Scorer, spec: str, opts: EvalOptions, cache: Path | None, extra_key: Any = None
) -> dict[str, Any]:
    """``run_suite(scorer, opts)``, one task at a time through ``cache`` (None: no cache). A result records
    the tasks it took from the cache under ``cached``."""
    res: dict[str, Any] = {"model": scorer.describe(), "options": asdict(opts), "seconds": {}}
    ident = model_identity(spec) if cache is not None else None
    todo = []
    for task in opts.tasks:
        f = None
        if cache is not None:
            key = json.dumps(
                [
                    ident,
                    task,
                    asdict(replace(opts, tasks=(task,))),
                    res["model"],
                    extra_key,
                    eval_code_hash(),
                ],
                sort_keys=True,
                default=str,
            )
            f = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
            if f.is_file():
                hit = json.loads(f.read_text())
                res[task], res["seconds"][task] = hit["result"], hit["seconds"]
                res.setdefault("cached", []).append(task)
                log.info("%s: %s from the cache (%s)", scorer.name, task, f)
                continue
        todo.append((task, f))
    if todo:
        new = run_suite(scorer, replace(opts, tasks=tuple(t for t, _ in todo)))
        for task, f in todo:
            res[task], res["seconds"][task] = new[task], new["seconds"][task]
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(
                    json.dumps(
                        {"spec": spec, "task": task, "result": new[task], "seconds": new["seconds"][task]}
                    )
                )
    return res


# ----------------------------------------------------------------------------------------------- benchmarks
def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a JSON document by dotted key; list items are named by their ``setting``/``name``."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            label = v.get("setting") or v.get("name") if isinstance(v, dict) else None
            out.update(flatten(v, f"{prefix}[{label or i}]"))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def speed_ratios(paths: list[Path]) -> dict[str, dict[str, float]]:
    """``{file name: {key: ratio}}`` for the keys of ``bench_*.json`` that are side-by-side ratios."""
    res = {}
    for p in paths:
        try:
            flat = flatten(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", p, e)
            continue
        keys = {k: v for k, v in flat.items() if "speedup" in k.rsplit(".", 1)[-1] or "_vs_" in k}
        keys = {k: v for k, v in keys.items() if not k.startswith("args.")}
        if keys:
            res[p.name] = keys
    return res


# ----------------------------------------------------------------------------------------------- markdown
def main_rows(results: dict[str, dict[str, Any]], curves: dict[str, Curve]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        m, c = r["model"], curves.get(name)
        e = r.get("bpb", {})
        rob, cute, ml = r.get("robustness"), r.get("cute"), r.get("multilingual")
        rows.append(
            [
                f"**{name}**",
                m["kind"],
                human(m["params"]),
                str(c.total_steps) if c and c.total_steps else "—",
                (human(c.total_flops) + ("" if c.flops_exact else " ≈")) if c and c.total_flops else "—",
                f"{c.total_wall_s:,.0f} s" if c and c.total_wall_s else "—",
                f4(e.get("bpb")),
                f4(ml["pooled_bpb"]) if ml else "—",
                f"{e['bytes_per_s']:,.0f}" if "bytes_per_s" in e else "—",
                f"{e['bytes_per_word']:.2f}" if "bytes_per_word" in e else "—",
                f"{e['kept_ratio']:.3f}" if "kept_ratio" in e else "—",
                f"{rob['mean_delta']:+.3f} ({100 * rob['mean_rel']:+.1f}%)" if rob else "—",
                f"{cute['acc']:.3f} / {cute['acc_norm']:.3f}" if cute else "—",
            ]
        )
    return rows


MAIN_HEADER = [
    "model",
    "type",
    "params",
    "train steps",
    "train FLOPs",
    "train time",
    "English bpb",
    "multilingual bpb †",
    "eval bytes/s",
    "bytes/word",
    "kept ratio",
    "noise Δbpb (mean)",
    "CUTE acc / acc_norm",
]
MAIN_FOOTNOTE = (
    "† held-out chatterbot dialogs (28 languages, pooled), scored on a model that trained on them: "
    "the row's experiment trained again with `data=mixture` (90% Shakespeare, 10% dialogs; "
    '"Multilingual" in docs/results.md), or the row itself if its data had the dialogs; the teacher '
    "is pretrained. Every other column: the row's own run (the byte models: Shakespeare only)."
)


TIMING_COLUMNS = ("train time", "eval bytes/s")


def main_table(
    results: dict[str, dict[str, Any]], curves: dict[str, Curve], timings: bool = True
) -> list[str]:
    keep = [i for i, h in enumerate(MAIN_HEADER) if timings or h not in TIMING_COLUMNS]
    return table([MAIN_HEADER[i] for i in keep], [[r[i] for i in keep] for r in main_rows(results, curves)])


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(
    readme: Path,
    out: Path,
    results: dict[str, dict[str, Any]],
    curves: dict[str, Curve],
    images: dict[str, Path],
    timings: bool = True,
) -> bool:
    """Replace the block between ``README_START`` and ``README_END`` in ``readme`` with the main table and the
    bpb-vs-FLOPs plot. Returns False (and changes nothing) when the markers are missing."""
    text = readme.read_text() if readme.is_file() else ""
    if README_START not in text or README_END not in text:
        log.warning("%s has no %s ... %s block: README not updated", readme, README_START, README_END)
        return False
    block = [README_START, "", *main_table(results, curves, timings), ""]
    if any("multilingual" in r for r in results.values()):
        block += [MAIN_FOOTNOTE, ""]
    if "bpb_vs_flops" in images:
        block.append(
            f"![validation bpb vs training FLOPs]({os.path.relpath(images['bpb_vs_flops'], readme.parent)})"
        )
    block += [
        "",
        f"Full results, commands and plots: [{os.path.relpath(out, readme.parent)}]"
        f"({os.path.relpath(out, readme.parent)}).",
        "",
        README_END,
    ]
    head, rest = text.split(README_START, 1)
    readme.write_text(head + "\n".join(block) + rest.split(README_END, 1)[1])
    return True


def write_markdown(
    args: argparse.Namespace,
    opts: EvalOptions,
    results: dict[str, dict[str, Any]],
    curves: dict[str, Curve],
    images: dict[str, Path],
    ratios: dict[str, dict[str, float]],
    notes: list[str],
) -> str:
    out = Path(args.out)
    rel = {k: os.path.relpath(v, out.parent) for k, v in images.items()}
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        commit = "unknown"
    L = [
        "# bytelm results",
        "",
        f"Generated by `scripts/report.py` on {dt.date.today().isoformat()} (commit `{commit}`, torch "
        f"{torch.__version__}, {dev}, {torch.get_num_threads()} threads). Every number below is measured, by "
        "the command printed next to it. Regenerate this page with:",
        "",
        "```",
        shlex.join(["python", "scripts/report.py", *sys.argv[1:]])
        if args.argv is None
        else shlex.join(["python", "scripts/report.py", *args.argv]),
        "```",
        "",
        "Sets: held-out English = the canonical Shakespeare validation works (Hamlet, Twelfth Night, both "
        f"editions, Sonnets), multilingual = the `chatterbot-corpus` dialogs; at most {opts.max_bytes:,} "
        "bytes per set (an equal share from each document; whole documents, evenly spaced, when the share "
        "would be under 512 bytes). bpb = bits per text byte. See docs/eval.md for definitions.",
        "",
        "## Main table",
        "",
    ]
    L += main_table(results, curves, args.timings)
    if any("multilingual" in r for r in results.values()):
        L += ["", MAIN_FOOTNOTE.replace("in docs/results.md", "below")]
    timing_note = (
        "Train time is the sum of logged step times (no validation, no checkpointing). eval bytes/s: "
        f"forward only, batch {args.batch_size}, on the device above."
        if args.timings
        else "Absolute timings (train time, eval bytes/s, bpb vs time) are left out (`--no-timings`): "
        "the runs shared their machine with other jobs, so their times measure its load. Speed "
        "comparisons: the side-by-side ratios below."
    )
    L += [
        "",
        "`≈`: FLOPs from 6 × non-embedding parameters (no exact formula for this architecture). "
        f"{timing_note} Train FLOPs of the hierarchical models count the bytes per word logged in training "
        "(`bytelm.eval.curves.run_training_flops`), the rule that sets flat_tiny's `trainer.flops_budget`: "
        "flat_tiny trains the most steps within hat_tiny's FLOPs.",
        "",
    ]
    for key, title in (("bpb_vs_flops", "bpb vs training FLOPs"), ("bpb_vs_wall", "bpb vs training time")):
        if key in rel:
            L.append(f"![{title}]({rel[key]})")
    L += ["", "### Reproduce each row", ""]
    for n, r in results.items():
        L.append(
            f"- **{n}**"
            + (f": trained by `{r['train_command']}`; evaluated by" if r.get("train_command") else ":")
            + f" `{r['command']}`"
        )
        if r.get("cached"):
            L[-1] += f" ({', '.join(r['cached'])} from the evaluation cache)"
        if t := r.get("multilingual_run"):
            L.append(
                f"  - multilingual: `{t['name']}`"
                + (f", trained by `{t['train_command']}`" if t.get("train_command") else "")
                + f"; evaluated by `{t['command']}`"
            )
    ml = {n: r["multilingual"] for n, r in results.items() if "multilingual" in r}
    if ml:
        langs = list(next(iter(ml.values()))["languages"])
        split = next(iter(ml.values()))["split"]
        which = (
            "the held-out 10% of dialogs (canonical validation split)"
            if split == "validation"
            else "all dialogs (no compared model trained on the corpus)"
        )
        L += [
            "",
            "## Multilingual bits per byte",
            "",
            "Only models that trained on the languages are scored: a byte model trained on English alone "
            "has learned to rule out the bytes of other scripts and pays more than 8 bits (a uniform guess) "
            "for each byte of a script it never saw, which says nothing about its architecture. Each "
            "compared experiment was trained a second time with `data=mixture` (90% Shakespeare, 10% "
            "`chatterbot-corpus` dialogs; the same experiment, steps and equal-FLOPs rule otherwise): its "
            "*mixture run*. The teacher is the pretrained SmolLM2-135M.",
            "",
        ]
        rows = []
        for n in ml:
            t = results[n].get("multilingual_run")
            rows.append(
                [
                    f"**{n}**",
                    f4(results[n].get("bpb", {}).get("bpb")),
                    f4(t["english_bpb"]) if t else "(the same run)",
                    f4(ml[n]["pooled_bpb"]),
                    f4(ml[n]["macro_bpb"]),
                    t["name"] if t else "this row",
                ]
            )
        L += table(
            [
                "model",
                "English bpb (row's run)",
                "English bpb (mixture run)",
                "multilingual bpb (pooled)",
                "mean over languages",
                "multilingual scored on",
            ],
            rows,
        )
        L += [
            "",
            f"Per language of `chatterbot-corpus`, {which}; bytes evaluated in the last column. MrT5 scores "
            "each row's continuation only: fewer bytes, — where a language's few bytes leave none, and its "
            "mean over languages is over the languages it scored.",
            "",
        ]
        rows = [
            [
                lang,
                *[f4(v["languages"].get(lang, {}).get("bpb")) for v in ml.values()],
                f"{next(iter(ml.values()))['languages'][lang]['bytes']:,}",
            ]
            for lang in langs
        ]
        rows.append(["**pooled**", *[f"**{f4(v['pooled_bpb'])}**" for v in ml.values()], ""])
        rows.append(["mean over languages", *[f4(v["macro_bpb"]) for v in ml.values()], ""])
        L += table(["language", *ml, "bytes"], rows)
        scripts = list(next(iter(ml.values()))["scripts"])
        L += ["", "Pooled by writing system:", ""]
        L += table(
            ["script", *ml], [[sc, *[f4(v["scripts"].get(sc)) for v in ml.values()]] for sc in scripts]
        )
        if "multilingual" in rel:
            L += ["", f"![bpb per language]({rel['multilingual']})"]
    rob = {n: r["robustness"] for n, r in results.items() if "robustness" in r}
    if rob:
        conds = list(next(iter(rob.values()))["conditions"])
        L += [
            "",
            "## Robustness to noise",
            "",
            "bpb of the held-out English text after seeded noise "
            "(`kind@fraction of bytes`), as the change vs clean text: Δbpb (relative). Noise touches ASCII "
            "bytes only (docs/eval.md).",
            "",
        ]
        rows = [["clean", *[f4(v["clean_bpb"]) for v in rob.values()]]]
        rows += [
            [
                c,
                *[
                    f"{v['conditions'][c]['delta']:+.3f} ({100 * v['conditions'][c]['rel']:+.1f}%)"
                    for v in rob.values()
                ],
            ]
            for c in conds
        ]
        rows.append(
            ["**mean**", *[f"**{v['mean_delta']:+.3f} ({100 * v['mean_rel']:+.1f}%)**" for v in rob.values()]]
        )
        L += table(["condition", *rob], rows)
        if "robustness" in rel:
            L += ["", f"![robustness]({rel['robustness']})"]
    cute = {n: r["cute"] for n, r in results.items() if "cute" in r}
    if cute:
        tasks = list(next(iter(cute.values()))["tasks"])
        L += [
            "",
            "## Character-level tasks (CUTE-style)",
            "",
            f"{opts.cute_items} seeded items per task (seed {opts.seed}, {opts.cute_shots} solved examples "
            "each, 4 candidates: chance 0.25), scored by log-likelihood ranking: acc (sum) / acc_norm (per "
            "byte).",
            "",
        ]
        from bytelm.eval.cute import generate_suite, majority_baseline

        prior = majority_baseline(
            generate_suite(tasks, n_per_task=opts.cute_items, seed=opts.seed, shots=opts.cute_shots)
        )
        rows = [
            [
                t,
                *[f"{v['tasks'][t]['acc']:.2f} / {v['tasks'][t]['acc_norm']:.2f}" for v in cute.values()],
                f"{prior[t]:.2f}",
            ]
            for t in tasks
        ]
        rows.append(
            [
                "**mean**",
                *[f"**{v['acc']:.3f} / {v['acc_norm']:.3f}**" for v in cute.values()],
                f"{sum(prior.values()) / len(prior):.3f}",
            ]
        )
        L += table(["task", *cute, "majority answer"], rows)
        L += [
            "",
            "*majority answer*: always giving the task's most common right answer (the answer prior). For "
            "`count` most letters occur once, so it is well above chance; compare the models with it there.",
        ]
        if "cute" in rel:
            L += ["", f"![CUTE-style accuracy]({rel['cute']})"]
    L += ["", "## Speed (side-by-side benchmarks)", ""]
    if ratios:
        for fname, kv in ratios.items():
            L += [f"From `out/{fname}` (written by `scripts/{fname.replace('.json', '.py')}`):", ""]
            L += table(["ratio", "value"], [[k, f"{v:.3g}"] for k, v in kv.items()]) + [""]
        if "speed" in rel:
            L += [f"![speed ratios]({rel['speed']})", ""]
    else:
        L += ["No `out/bench_*.json` found: run `make bench`, then this script again.", ""]
    above = sorted({lang for v in ml.values() for lang, x in v["languages"].items() if (x["bpb"] or 0) > 8.0})
    if above:
        notes.append(
            f"- bpb above 8 (a uniform guess over bytes) on {len(above)} languages ({', '.join(above[:6])}"
            f"{', ...' if len(above) > 6 else ''}), though every model scored here trained on the "
            "dialogs: a short run with 10% dialogs sees little of each script."
        )
    if skipped := [n for n, r in results.items() if r.get("multilingual_skipped")]:
        notes.append(
            f"- No multilingual numbers for {', '.join(skipped)}: trained without the dialogs and no "
            "`--multilingual-run` given."
        )
    notes.append(
        "- Byteified models (`make byteify`: SmolLM2-135M's blocks as the backbone) are compared with "
        'their teacher per segmenter and stage, on the same bytes, in docs/byteify.md ("Measured results").'
    )
    curve_notes = [f"- {n}: {c.source}" for n, c in curves.items()]
    if curve_notes or notes:
        L += ["## Notes", "", *notes]
        if curve_notes:
            L += ["", "Training logs read:", "", *curve_notes]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    d = EvalOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="a model to evaluate: checkpoint, run folder or exported folder (repeatable)",
    )
    p.add_argument(
        "--multilingual-run",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="the model whose multilingual numbers stand in row NAME: NAME's experiment trained on the "
        "dialogs, e.g. with data=mixture (repeatable). Without one, a row that did not train on the "
        "dialogs gets no multilingual numbers",
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="reuse evaluations stored in DIR (same model file, task, options and evaluation code) and "
        "store new ones there",
    )
    p.add_argument(
        "--teacher",
        nargs="?",
        const="teacher",
        default=None,
        metavar="SPEC",
        help="add the subword teacher as a reference row (default SmolLM2-135M; or a .gguf / HF folder)",
    )
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="bytes per evaluated set (0 = all)")
    p.add_argument(
        "--teacher-max-bytes",
        type=int,
        default=None,
        help="bytes per set for the teacher (default --max-bytes; the teacher is slow on CPU)",
    )
    p.add_argument("--tasks", type=csv_list, default=d.tasks, help=f"subset of {','.join(TASK_NAMES)}")
    p.add_argument("--languages", type=csv_list, default=(), help="multilingual subset (default: all)")
    p.add_argument(
        "--multilingual-split",
        choices=SPLITS,
        default=d.ml_split,
        help="chatterbot dialogs: validation, all, or auto (validation if any run trained on them)",
    )
    p.add_argument("--cute-items", type=int, default=d.cute_items)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--bench", default="out", help="folder with bench_*.json")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--img-dir", default=None, help="plots folder (default: <out folder>/img)")
    p.add_argument(
        "--readme",
        default=None,
        metavar="PATH",
        help=f"also put the main table and plot between {README_START} and {README_END} in PATH",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--no-timings",
        dest="timings",
        action="store_false",
        help="leave out absolute timings (train time, eval bytes/s, bpb vs time): for runs on a machine "
        "shared with other jobs, whose times measure its load",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.run and not args.teacher:
        sys.exit("report.py: give at least one --run NAME=CKPT (or --teacher)")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = EvalOptions(
        tasks=tuple(args.tasks),
        max_bytes=args.max_bytes,
        seed=args.seed,
        cute_items=args.cute_items,
        languages=tuple(args.languages),
        ml_split=args.multilingual_split,
    )
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, Curve] = {}
    notes: list[str] = []
    cache = Path(args.cache) if args.cache else None
    scorers = {
        name: (spec, load_scorer(spec, device=args.device, batch_size=args.batch_size, name=name))
        for name, spec in map(parse_run, args.run)
    }
    ml_specs = dict(map(parse_run, args.multilingual_run))
    if unknown := sorted(set(ml_specs) - set(scorers)):
        sys.exit(f"report.py: --multilingual-run for {', '.join(unknown)}, which no --run names")
    ml_scorers = {
        name: (
            spec,
            load_scorer(spec, device=args.device, batch_size=args.batch_size, name=f"{name} (mixture)"),
        )
        for name, spec in ml_specs.items()
    }
    # one multilingual split for every row: held-out dialogs as soon as one model trained on the corpus
    configs = [getattr(s, "cfg", None) for _, s in [*scorers.values(), *ml_scorers.values()]]
    opts = replace(opts, ml_split=resolve_split(opts.ml_split, configs))
    own_ml = "multilingual" in opts.tasks
    for name, (spec, scorer) in scorers.items():
        row_opts = opts
        if own_ml and (name in ml_scorers or not trained_on_chatterbot(getattr(scorer, "cfg", None))):
            row_opts = replace(opts, tasks=tuple(t for t in opts.tasks if t != "multilingual"))
        res = evaluate(scorer, spec, row_opts, cache, args.batch_size)
        res["command"] = reproduce_command(spec, row_opts, ["--name", name])
        res["train_command"] = train_command(spec)
        if own_ml and name in ml_scorers:
            t_spec, t_scorer = ml_scorers.pop(name)
            t_opts = replace(opts, tasks=tuple(t for t in ("bpb", "multilingual") if t in opts.tasks))
            twin = evaluate(t_scorer, t_spec, t_opts, cache, args.batch_size)
            res["multilingual"] = twin["multilingual"]
            res["multilingual_run"] = {
                "name": t_spec,
                "command": reproduce_command(t_spec, t_opts, ["--name", t_scorer.name]),
                "train_command": train_command(t_spec),
                "english_bpb": twin.get("bpb", {}).get("bpb"),
                "cached": twin.get("cached", []),
            }
            print(f"[{name}: multilingual] {res['multilingual_run']['command']}", flush=True)
        elif own_ml and "multilingual" not in res:
            res["multilingual_skipped"] = True
        results[name] = res
        print(f"[{name}] {res['command']}", flush=True)
        if isinstance(scorer, ByteScorer) and scorer.cfg is not None:
            curves[name] = training_curve(
                spec, scorer.cfg, scorer.model, res.get("bpb", {}).get("bytes_per_word")
            )
    del scorers, ml_scorers
    if args.teacher:
        t_opts = replace(
            opts, max_bytes=args.teacher_max_bytes if args.teacher_max_bytes is not None else opts.max_bytes
        )
        try:
            teacher = load_scorer(args.teacher, device=args.device)
        except Exception as e:  # noqa: BLE001 - any failure to load the teacher skips its row, with the reason
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.warning("teacher row skipped: %s", reason)
            notes.append(f"- Teacher reference row skipped: could not load `{args.teacher}` ({reason}).")
        else:
            res = evaluate(teacher, args.teacher, t_opts, cache, args.batch_size)
            res["command"] = reproduce_command(args.teacher, t_opts)
            results[teacher.name] = res
            print(f"[{teacher.name}] {res['command']}", flush=True)
            if t_opts.max_bytes != opts.max_bytes:
                notes.append(
                    f"- The teacher row used at most {t_opts.max_bytes:,} bytes per set (the byte models "
                    f"{opts.max_bytes:,}): the first bytes of the same documents."
                )
    out = Path(args.out)
    img = Path(args.img_dir) if args.img_dir else out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    kinds = {n: r["model"]["kind"] for n, r in results.items()}
    images: dict[str, Path] = {}
    with_curves = {n: c for n, c in curves.items() if c.steps}
    if with_curves:
        images["bpb_vs_flops"] = plots.plot_curves(with_curves, kinds, "flops", img / "bpb_vs_flops.png")
        if args.timings and any(c.wall_s for c in with_curves.values()):
            images["bpb_vs_wall"] = plots.plot_curves(with_curves, kinds, "wall", img / "bpb_vs_wall.png")
    rob = {n: r["robustness"] for n, r in results.items() if "robustness" in r}
    if rob:
        conds = list(next(iter(rob.values()))["conditions"])
        images["robustness"] = plots.plot_grouped_bars(
            conds,
            {n: [v["conditions"][c]["delta"] for c in conds] for n, v in rob.items()},
            kinds,
            img / "robustness.png",
            "Δ bpb vs clean text",
            "Degradation under noise (lower is more robust)",
            0.0,
        )
    ml = {n: r["multilingual"] for n, r in results.items() if "multilingual" in r}
    if ml:
        langs = list(next(iter(ml.values()))["languages"])
        images["multilingual"] = plots.plot_grouped_bars(
            langs,
            {n: [v["languages"][x]["bpb"] or float("nan") for x in langs] for n, v in ml.items()},
            kinds,
            img / "multilingual.png",
            "bits per byte",
            "bpb per language (chatterbot-corpus)",
            horizontal=True,
        )
    cute = {n: r["cute"] for n, r in results.items() if "cute" in r}
    if cute:
        tasks = list(next(iter(cute.values()))["tasks"])
        images["cute"] = plots.plot_grouped_bars(
            tasks,
            {n: [v["tasks"][t]["acc"] for t in tasks] for n, v in cute.items()},
            kinds,
            img / "cute.png",
            "accuracy (log-likelihood ranking)",
            "CUTE-style character tasks (dotted: chance)",
            0.25,
        )
    ratios = speed_ratios(sorted(Path(args.bench).glob("bench_*.json")))
    if ratios:
        images["speed"] = plots.plot_ratios(
            {f"{f.replace('.json', '')}: {k}": v for f, kv in ratios.items() for k, v in kv.items()},
            img / "speed.png",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(write_markdown(args, opts, results, curves, images, ratios, notes))
    raw = {"results": results, "curves": {n: vars(c) for n, c in curves.items()}, "speed_ratios": ratios}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {out}, {out.with_suffix('.json')} and {len(images)} plots under {img}")
    if args.readme and update_readme(Path(args.readme), out, results, curves, images, args.timings):
        print(f"updated the results block of {args.readme}")
    return raw


if __name__ == "__main__":
    main()
