"""Every reference in the docs and docstrings points at something that exists.

Scanned: the docstrings and comments of ``bytelm/**/*.py``, ``scripts/*.py`` and ``tests/*.py``, the
comments of the Hydra tree (``bytelm/conf/**/*.yaml``) and every tracked ``*.md`` file. Checked:

- repository paths (``docs/design.md``, ``bytelm/models/flat.py``, ``scripts/demo.py``,
  ``tests/data/test_words.py``, ``slurm/train.sbatch``; ``conf/...`` means ``bytelm/conf/...``) and relative
  Markdown links exist; a ``#fragment`` on a Markdown file names one of its headings (GitHub's anchors);
- dotted names (``bytelm.models.flat.FlatByteLM``) import (the longest module prefix) and resolve (``getattr``
  for the rest).

Globs (``tests/data/test_data_*.py``), placeholders in angle brackets and URLs are not references and are
skipped.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import re
import subprocess
import tokenize
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PATH_RE = re.compile(r"(?<![\w./~:-])((?:bytelm|docs|scripts|tests|slurm|conf)/[\w./#*?{}<>$-]*[\w/*}>])")
NAME_RE = re.compile(r"(?<![\w./-])(bytelm(?:\.[A-Za-z_]\w*)+)")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
GLOB = re.compile(r"[*?<>{}$\[\]]")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted({ROOT / p for p in out.split()})


def python_prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a Python file."""
    src = path.read_text(encoding="utf-8")
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):  # a docstring
                out.append((first.lineno, first.value.value))
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    return out


def yaml_prose(path: Path) -> list[tuple[int, str]]:
    return [(i, ln[ln.index("#") :]) for i, ln in enumerate(path.read_text().splitlines(), 1) if "#" in ln]


def md_prose(path: Path) -> list[tuple[int, str]]:
    return list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


@cache
def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for ln in md.read_text(encoding="utf-8").splitlines():
        if ln.lstrip().startswith("```"):
            fence = not fence
        m = re.match(r"#{1,6}\s+(.*)", ln)
        if m and not fence:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def check_path(target: str, base: Path) -> str | None:
    """None when ``target`` (a path, optionally with ``#fragment``) exists relative to ``base``; else why
    not."""
    path, _, frag = target.partition("#")
    if path.startswith("conf/"):
        path = "bytelm/" + path
    p = (base / path).resolve() if path else None
    if p is None:
        return None
    if not p.exists():
        return "does not exist"
    if frag and p.suffix == ".md" and frag not in anchors(p):
        return f"has no heading #{frag}"
    return None


@cache
def check_name(name: str) -> str | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        mod_name = ".".join(parts[:n])
        try:
            found = importlib.util.find_spec(mod_name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            continue
        obj = importlib.import_module(mod_name)
        for attr in parts[n:]:
            if not hasattr(obj, attr):
                return f"{mod_name} has no {'.'.join(parts[n:])}"
            obj = getattr(obj, attr)
        return None
    return "no such module"


def references(text: str) -> list[tuple[str, str]]:
    """('path' | 'link' | 'name', reference) found in ``text``."""
    out: list[tuple[str, str]] = []
    for m in LINK_RE.finditer(text):
        out.append(("link", m.group(1)))
    for m in PATH_RE.finditer(text):
        out.append(("path", m.group(1)))
    for m in NAME_RE.finditer(text):
        out.append(("name", m.group(1)))
    return out


def dangling() -> list[str]:
    sources: list[tuple[Path, list[tuple[int, str]]]] = []
    for p in tracked("bytelm/*.py", "scripts/*.py", "tests/*.py"):
        sources.append((p, python_prose(p)))
    for p in tracked("bytelm/conf/*.yaml"):
        sources.append((p, yaml_prose(p)))
    for p in tracked("*.md"):
        sources.append((p, md_prose(p)))
    bad = []
    for path, chunks in sources:
        rel = path.relative_to(ROOT)
        for line, text in chunks:
            for kind, ref in references(text):
                if GLOB.search(ref) or "://" in ref or ref.startswith("mailto:"):
                    continue
                if kind == "link":
                    if ref.startswith("#"):
                        why = None if path.suffix != ".md" or ref[1:] in anchors(path) else "no such heading"
                    else:
                        why = check_path(ref, path.parent)
                elif kind == "path":
                    why = check_path(ref.rstrip("/") if "#" not in ref else ref, ROOT)
                else:
                    why = check_name(ref)
                if why:
                    bad.append(f"{rel}:{line}: {ref} ({why})")
    return bad


def test_slug_matches_github():
    assert (
        slug("Learned chunks in the hierarchical model (`model.chunker=gate`)")
        == "learned-chunks-in-the-hierarchical-model-modelchunkergate"
    )
    assert slug("The fused head and its exact prior (`bytelm/models/byte_prior.py`)") == (
        "the-fused-head-and-its-exact-prior-bytelmmodelsbyte_priorpy"
    )


def test_the_checker_finds_dangling_references(tmp_path):
    assert check_name("bytelm.models.flat.FlatByteLM") is None
    assert check_name("bytelm.models.flat.NoSuchThing") is not None
    assert check_name("bytelm.no_such_module") is not None
    assert check_path("docs/design.md#models", ROOT) is None
    assert check_path("docs/design.md#no-such-heading", ROOT) is not None
    assert check_path("docs/no_such_page.md", ROOT) is not None
    refs = references("see docs/x.md, [y](z.md#a) and bytelm.a.b; not https://x.org/docs/q.md")
    assert ("path", "docs/x.md") in refs and ("link", "z.md#a") in refs and ("name", "bytelm.a.b") in refs
    assert ("path", "docs/q.md") not in refs


def test_no_dangling_references():
    bad = dangling()
    assert not bad, f"{len(bad)} dangling references:\n" + "\n".join(bad)


def test_no_reference_to_the_private_brief():
    """Users cannot see the team's brief: the code and docs point into docs/ instead."""
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in tracked("bytelm/*.py", "scripts/*.py", "tests/*.py", "*.md", "bytelm/conf/*.yaml")
        if p.name != Path(__file__).name
        for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "DESIGN" + ".md" in ln
    ]
    assert not hits, hits
