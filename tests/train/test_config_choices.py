"""Choice fields: every one is checked while the config is composed (before anything is built), with the key
and the allowed values in the message; composed values are plain strings; a misspelt experiment is an
error."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from bytelm.choices import CHOICES, check_choices, choice, schema_of
from bytelm.config import Config, config_from_dict, config_to_dict, load_config, validate


def _choice_fields(cls: type, prefix: str = "") -> list[tuple[str, tuple[str, ...], str]]:
    """(dotted key, options, default) of every choice field reachable from ``cls`` (not through lists)."""
    import typing

    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if CHOICES in f.metadata:
            out.append((prefix + f.name, f.metadata[CHOICES], f.default))
        elif dataclasses.is_dataclass(hints[f.name]):
            out.extend(_choice_fields(hints[f.name], f"{prefix}{f.name}."))
    return out


FIELDS = _choice_fields(Config)
# what issue 18 names: each must be a choice field
REQUIRED = {
    "model.arch",
    "model.chunker",
    "model.pooling",
    "model.decoder_cross",
    "model.attn_backend",
    "optim.schedule",
    "data.on_error",
    "data.source",
    "strategy.name",
    "trainer.precision",
    "logger.kind",
    "distill.kind",
    "distill.alm_mode",
}


def test_the_named_fields_are_choice_fields():
    assert {k for k, _, _ in FIELDS} >= REQUIRED, REQUIRED - {k for k, _, _ in FIELDS}
    assert len(FIELDS) >= 20


@pytest.mark.parametrize("key,options,default", FIELDS, ids=[k for k, _, _ in FIELDS])
def test_misspelt_value_fails_at_composition_naming_key_and_options(key, options, default):
    bad = options[0] + "x"
    with pytest.raises(Exception) as e:
        load_config([f"{key}={bad}"])
    msg = str(e.value)
    assert key in msg and bad in msg, msg
    assert all(o in msg for o in options), msg


@pytest.mark.parametrize("which", [0, -1])
def test_options_are_accepted_and_come_back_as_plain_strings(which):
    """Every field set to its first (then last) option in one composition: accepted, and a plain str
    (runtime configs never hold the schema's Enums)."""
    got = load_config([f"{key}={options[which]}" for key, options, _ in FIELDS])
    for key, options, _ in FIELDS:
        obj = got
        for part in key.split("."):
            obj = getattr(obj, part)
        assert type(obj) is str and obj == options[which], key


def test_composed_config_round_trips_as_plain_strings():
    cfg = load_config(["experiment=hat_tiny"])
    d = config_to_dict(cfg)
    assert d["model"]["arch"] == "hierarchical" and type(d["model"]["arch"]) is str
    assert config_from_dict(d) == cfg


def test_mixture_components_are_checked():
    cfg = load_config(["data=mixture"])
    assert len(cfg.data.mixture) >= 2
    d = config_to_dict(cfg)
    d["data"]["mixture"][1]["source"] = "chatterbto"
    with pytest.raises(Exception, match="chatterbto"):
        config_from_dict(d)


def test_python_built_config_is_checked_too():
    cfg = Config()
    cfg.optim.schedule = "cosin"
    with pytest.raises(ValueError, match=r"optim\.schedule='cosin'.*cosine, wsd, constant"):
        validate(cfg)
    cfg = Config()
    cfg.model.gate.k = -1.0  # not a choice: untouched
    cfg.data.mixture = [dataclasses.replace(cfg.data, mixture=[])]
    cfg.data.mixture[0].on_error = "skp"
    with pytest.raises(ValueError, match=r"data\.mixture\[0\]\.on_error='skp'"):
        check_choices(cfg)


@pytest.mark.parametrize("devices", [1, 2, [0, 1], "auto", "-1", "0,1"])
def test_valid_devices(devices):
    cfg = Config()
    cfg.trainer.devices = devices
    validate(cfg)


@pytest.mark.parametrize("devices", ["tw0", "", 2.5, True, [0, "a"]])
def test_invalid_devices_name_the_key(devices):
    cfg = Config()
    cfg.trainer.devices = devices
    with pytest.raises(ValueError, match="trainer.devices"):
        validate(cfg)


def test_invalid_devices_fail_when_composed():
    with pytest.raises(Exception, match="trainer.devices"):
        load_config(["trainer.devices=tw0"])


def test_byteify_stage_is_checked():
    with pytest.raises(Exception, match="byteify.stage"):
        load_config(["byteify.stage=3"])


def test_choice_default_must_be_an_option():
    with pytest.raises(ValueError, match="default 'c'"):
        choice("c", "a", "b")


def test_schema_enum_members_are_the_options():
    import enum
    import typing

    schema = schema_of(Config)
    opt = typing.get_type_hints(schema)["optim"]
    sched = typing.get_type_hints(opt)["schedule"]
    assert issubclass(sched, enum.Enum) and [m.name for m in sched] == ["cosine", "wsd", "constant"]


def test_cli_cfg_job_fails_before_building_and_misspelt_experiment_fails():
    """`--cfg job` prints the config without running anything: it must already reject a misspelt value;
    a misspelt experiment name must not silently train the default model."""
    r = subprocess.run(
        [sys.executable, "-m", "bytelm.train", "experiment=hat_tiny", "logger.kind=wandbb", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "logger.kind" in r.stderr and "wandbb" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "bytelm.train", "experiment=hat_tiy", "debug=cpu", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "experiment/hat_tiy" in r.stderr and "hat_tiny" in r.stderr, r.stderr[-2000:]
