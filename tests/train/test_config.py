"""Hydra tree: every experiment composes; typos fail naming the key; models/ stays framework-free."""

from __future__ import annotations

import ast
import pathlib

import pytest

from bytelm.config import CONF_DIR, Config, load_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_there_are_experiments():
    assert "flat_tiny" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    cfg = load_config([f"experiment={name}"])
    assert isinstance(cfg, Config)
    assert cfg.name == name
    dbg = load_config([f"experiment={name}", "debug=cpu"])
    assert dbg.trainer.max_steps <= 20


def test_misspelt_override_names_the_key():
    with pytest.raises(Exception, match="d_modle"):
        load_config(["model.d_modle=3"])
    with pytest.raises(Exception, match="d_modle"):
        load_config(["+model.d_modle=3"])


def test_misspelt_yaml_key_names_the_key(tmp_path):
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF_DIR, conf)
    (conf / "model" / "typo.yaml").write_text("arch: flat\nn_layres: 3\n")
    import bytelm.config as bc

    old = bc.CONF_DIR
    bc.CONF_DIR = conf
    try:
        with pytest.raises(Exception, match="n_layres"):
            bc.load_config(["model=typo"])
    finally:
        bc.CONF_DIR = old


def test_wrong_type_is_rejected():
    with pytest.raises(Exception, match="n_layers"):
        load_config(["model.n_layers=four"])


def test_models_import_no_training_frameworks():
    banned = {"lightning", "pytorch_lightning", "deepspeed", "hydra", "wandb", "omegaconf"}
    root = pathlib.Path(__file__).resolve().parents[2] / "bytelm" / "models"
    for f in root.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in banned, f"{f.name} imports {n}"
