"""The console scripts: every ``[project.scripts]`` entry resolves, the commands the README and docs name are
installed ones, ``--help`` works, and CLI defaults are the library's (one constant each)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml (read as text: tomllib is 3.11+, and the installed entry points
    are those of the last ``pip install``)."""
    block = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', block, re.M))


def entry_point(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def test_every_console_script_resolves():
    s = scripts()
    assert {
        "bytelm-train",
        "bytelm-eval",
        "bytelm-generate",
        "bytelm-export",
        "bytelm-consolidate",
        "bytelm-prepare",
        "bytelm-distill-compare",
        "bytelm-memory",
    } <= set(s)
    for name, target in s.items():
        assert callable(entry_point(target)), name


def test_commands_named_in_the_docs_are_installed():
    """A ``bytelm-*`` command in the README or docs/ is a console script (no ``python -m`` only tools)."""
    s = scripts()
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for f in texts for m in re.findall(r"`(bytelm-[a-z-]+)", f.read_text())}
    assert named, "no bytelm-* command found in the docs"
    assert named <= set(s), sorted(named - set(s))


@pytest.mark.parametrize("name", ["bytelm-distill-compare", "bytelm-memory", "bytelm-generate"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        entry_point(scripts()[name])(["--help"])
    assert e.value.code == 0
    assert f"usage: {name}" in capsys.readouterr().out


def test_generate_cli_defaults_are_the_library_defaults():
    from bytelm.cli.generate import build_parser
    from bytelm.models.generate import DEFAULT_MAX_NEW_BYTES, DEFAULT_TEMPERATURE, generate, stream

    args = build_parser().parse_args(["x.ckpt"])
    assert (args.max_bytes, args.temperature) == (DEFAULT_MAX_NEW_BYTES, DEFAULT_TEMPERATURE)
    for fn in (generate, stream):
        params = inspect.signature(fn).parameters
        assert params["max_new_bytes"].default == DEFAULT_MAX_NEW_BYTES
        assert params["temperature"].default == DEFAULT_TEMPERATURE
        assert params["top_k"].default == args.top_k and params["top_p"].default == args.top_p
        assert params["draft"].default is None and args.draft == "auto"  # auto = None: drafts for greedy only


def test_generate_stop_text():
    from bytelm.cli.generate import parse_stop

    assert parse_stop(r"\n") == b"\n"
    assert parse_stop("é") == "é".encode()
    assert parse_stop(r"日\n") == "日\n".encode()


def test_memory_cli_prints_the_scaling_table(capsys):
    """``bytelm-memory`` (defaults) prints the table docs/scaling.md shows, row for row."""
    from bytelm.cli.memory import main, parse_size

    assert (
        parse_size("1.3B") == pytest.approx(1.3e9)
        and parse_size("350M") == 350e6
        and parse_size("7e9") == 7e9
    )
    main([])
    out = capsys.readouterr().out
    doc_rows = [
        ln
        for ln in (ROOT / "docs" / "scaling.md").read_text().splitlines()
        if re.match(r"\| [0-9.]+[MB] \|", ln)
    ]
    assert len(doc_rows) == 6
    for ln in doc_rows:
        assert ln in out, ln
    main(["--gpus", "1", "--sizes", "1B"])
    assert "| 1B | 14.9 |" in capsys.readouterr().out  # 16 bytes per parameter on one GPU
    with pytest.raises(SystemExit):
        main(["--sizes", "lots"])
