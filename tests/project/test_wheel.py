"""The wheel is self-contained: built from the source tree, installed into a fresh virtual environment, it
composes and trains an experiment from an empty folder (the configs ship inside the package).

The new environment reuses this one's dependencies through a ``.pth`` file (fast, no network) but not its
editable bytelm: a path line in a ``.pth`` file adds a folder without running the ``.pth`` files inside it, so
the editable-install hook is never loaded and ``import bytelm`` finds the installed wheel."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(900)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources, and a stale build/ in
    # the checkout could put deleted files into the wheel
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "bytelm", src / "bytelm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        timeout=600,
    )
    (whl,) = out.glob("bytelm-*.whl")
    return whl


def test_wheel_ships_every_config_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = ROOT / "bytelm" / "conf"
    expected = {f"bytelm/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
    assert len(expected) > 40
    assert expected <= names, sorted(expected - names)
    assert "bytelm/py.typed" in names and "bytelm/hf/modeling_bytelm.py" in names
    assert not any(n.startswith(("tests/", "scripts/", "conf/")) for n in names)


def test_wheel_install_trains_from_an_empty_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    py = venv / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        timeout=300,
    )
    purelib = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (purelib / "_bytelm_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = _run(
        [str(py), "-c", "import bytelm.config as c; print(c.__file__); print(c.CONF_DIR)"],
        cwd=work,
        env=env,
        timeout=120,
    ).stdout.split()
    assert where[0].startswith(str(purelib)), f"bytelm imported from {where[0]}, not from the wheel"
    assert Path(where[1]).is_dir() and Path(where[1]).is_relative_to(purelib)

    r = _run(
        [
            str(venv / "bin" / "bytelm-train"),
            "experiment=hat_tiny",
            "debug=cpu",
            "trainer.max_steps=3",
            "trainer.val_every=3",
            "trainer.ckpt_every=3",
            "trainer.out_dir=out",
        ],
        cwd=work,
        env=env,
        timeout=600,
    )
    assert (work / "out" / "checkpoints" / "last.ckpt").is_file(), r.stdout[-2000:] + r.stderr[-2000:]
    assert "val" in (r.stdout + r.stderr).lower()
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # nothing written outside the run folder

    # a user's own config folder beside the shipped tree (README: "Your own configs")
    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "my_hat.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: hat_tiny\nname: my_hat\nmodel: {d_model: 96}\n"
    )
    r = _run(
        [
            str(venv / "bin" / "bytelm-train"),
            "--config-dir",
            str(tmp_path / "myconf"),
            "experiment=my_hat",
            "--cfg",
            "job",
        ],
        cwd=work,
        env=env,
        timeout=300,
    )
    assert "name: my_hat" in r.stdout and "d_model: 96" in r.stdout and "arch: hierarchical" in r.stdout
