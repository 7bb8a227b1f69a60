"""Evaluation suite: bits per byte (held-out English, per language, under noise), bytes/s, bytes per word /
kept ratio, and CUTE-style character tasks, for bytelm checkpoints, exported folders and subword teachers.
See docs/eval.md; ``bytelm-eval`` (bytelm.cli.eval) and ``scripts/report.py`` are the entry points."""
