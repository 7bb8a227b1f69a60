"""User errors in the console scripts are one line and a non-zero exit; bugs keep their traceback
(bytelm.cli.errors). The scripts run as subprocesses (``python -m bytelm.cli.<script>``, this checkout first
on the path), two at a time; the checks of the folder case and of ``--debug`` / ``BYTELM_DEBUG`` run in
process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bytelm.cli.errors import EXIT_USER_ERROR, add_debug_flag, cli_main
from bytelm.errors import OptionError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    corrupt = d / "run" / "last.ckpt"  # random bytes where a checkpoint should be
    corrupt.parent.mkdir()
    corrupt.write_bytes(os.urandom(4096))
    folder = d / "exported"  # an exported-model folder whose config.json is broken
    folder.mkdir()
    (folder / "config.json").write_text('{"arch": "flat", ')
    return {"missing": d / "nope" / "last.ckpt", "corrupt": corrupt, "folder": folder, "out": d / "out"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BYTELM_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _run_all(cases: dict[str, list[str]], parallel: int = 2) -> dict[str, subprocess.CompletedProcess]:
    out: dict[str, subprocess.CompletedProcess] = {}
    keys = list(cases)
    for i in range(0, len(keys), parallel):
        procs = {
            k: subprocess.Popen(
                [sys.executable, "-m", *cases[k]],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
                cwd=ROOT,
            )
            for k in keys[i : i + parallel]
        }
        for k, p in procs.items():
            stdout, stderr = p.communicate(timeout=300)
            out[k] = subprocess.CompletedProcess(cases[k], p.returncode, stdout, stderr)
    return out


def _one_line(stderr: str, script: str, path: Path) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"bytelm-{script}: error: "), lines[0]
    assert str(path) in lines[0], lines[0]
    return lines[0]


def test_bad_checkpoints_give_one_line(bad_inputs):
    """Each console script, as a process, on a missing path and on a corrupt file."""
    b = bad_inputs
    cases: dict[str, list[str]] = {}
    for kind in ("missing", "corrupt"):
        path = str(b[kind])
        cases[f"generate/{kind}"] = ["bytelm.cli.generate", path, "--prompt", "a"]
        cases[f"eval/{kind}"] = ["bytelm.cli.eval", path, "--tasks", "bpb"]
        cases[f"export/{kind}"] = ["bytelm.cli.export", path, str(b["out"])]
    for key, r in _run_all(cases).items():
        script, kind = key.split("/")
        assert r.returncode == EXIT_USER_ERROR, (key, r.returncode, r.stderr)
        line = _one_line(r.stderr, script, b[kind])
        assert ("does not exist" if kind == "missing" else "cannot be read") in line, (key, line)
    assert not b["out"].exists()


def test_broken_folder_and_debug(bad_inputs, capsys, monkeypatch):
    """A folder with a broken config.json is a user error too; ``--debug`` or ``BYTELM_DEBUG=1`` brings the
    traceback back (the exception propagates)."""
    from bytelm.checkpoint import CorruptCheckpointError
    from bytelm.cli import eval as eval_cli
    from bytelm.cli import export as export_cli
    from bytelm.cli import generate as generate_cli

    monkeypatch.delenv("BYTELM_DEBUG", raising=False)
    b = bad_inputs
    with pytest.raises(SystemExit) as e:
        eval_cli.main([str(b["folder"]), "--tasks", "bpb"])
    assert e.value.code == EXIT_USER_ERROR
    _one_line(capsys.readouterr().err, "eval", b["folder"] / "config.json")
    with pytest.raises(SystemExit) as e:
        generate_cli.main([str(b["folder"])])
    _one_line(capsys.readouterr().err, "generate", b["folder"])
    gguf = b["corrupt"].with_name("model.gguf")  # a subword model file that is not GGUF
    gguf.write_bytes(b["corrupt"].read_bytes())
    with pytest.raises(SystemExit) as e:
        eval_cli.main([str(gguf), "--tasks", "bpb"])
    assert "cannot be loaded" in _one_line(capsys.readouterr().err, "eval", gguf)
    with pytest.raises(CorruptCheckpointError):
        generate_cli.main([str(b["corrupt"]), "--debug"])
    monkeypatch.setenv("BYTELM_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        export_cli.main([str(b["missing"]), str(b["out"])])


def _script(exc: BaseException):
    import argparse

    @cli_main("bytelm-x")
    def main(argv=None):
        p = argparse.ArgumentParser(prog="bytelm-x")
        add_debug_flag(p)
        p.parse_args(argv)
        raise exc

    return main


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv("BYTELM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        _script(OptionError("bad value 'x'\nsecond line"))([])
    assert e.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "bytelm-x: error: bad value 'x' second line\n"
    with pytest.raises(SystemExit):
        _script(FileNotFoundError("'a.ckpt' does not exist"))([])
    assert capsys.readouterr().err == "bytelm-x: error: 'a.ckpt' does not exist\n"
    with pytest.raises(ZeroDivisionError):  # a bug: the traceback stays
        _script(ZeroDivisionError("bug"))([])
    with pytest.raises(OptionError):  # --debug: the user error's traceback too
        _script(OptionError("bad"))(["--debug"])
    monkeypatch.setenv("BYTELM_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        _script(FileNotFoundError("gone"))([])
    monkeypatch.setenv("BYTELM_DEBUG", "0")
    with pytest.raises(SystemExit):
        _script(FileNotFoundError("gone"))([])


def test_bad_override_is_one_line(tmp_path, capsys, monkeypatch):
    """A misspelt Hydra key or an unknown value in a script's overrides is a user error too."""
    from bytelm.cli.prepare import main

    monkeypatch.delenv("BYTELM_DEBUG", raising=False)
    for override, named in (("data.nope=1", "data.nope"), ("data.source=nope", "'nope'")):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "out"), override])
        err = capsys.readouterr().err
        assert e.value.code == EXIT_USER_ERROR and err.count("\n") == 1, err
        assert err.startswith("bytelm-prepare: error: bad configuration override: ") and named in err, err
