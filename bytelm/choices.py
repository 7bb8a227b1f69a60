"""Choice fields: a ``str`` config field that only takes one of a fixed set of values.

The runtime dataclasses (``bytelm.config``, ``bytelm.models.config``) keep plain ``str`` fields, so model
code, checkpoints and exported ``config.json`` files only ever see strings. What Hydra composes against is a
*schema* built from them (``schema_of``) in which every choice field is an ``Enum`` of its options: OmegaConf
then rejects a misspelt value while the config is composed — also for ``--cfg job``, before anything is built
— with the key and the allowed values in the message. ``check_choices`` applies the same rule to a config
built in Python (a dataclass made by hand, a checkpoint's stored config).

This module is plain Python (no torch, no omegaconf) so model code may use ``choice``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from typing import Any

CHOICES = "choices"


def choice(default: str, *options: str) -> Any:
    """A dataclass field holding one of ``options`` (``default`` must be one of them)."""
    if default not in options:
        raise ValueError(f"default {default!r} is not one of {options}")
    return dataclasses.field(default=default, metadata={CHOICES: tuple(options)})


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return tp, False


@functools.cache
def schema_of(cls: type) -> type:
    """A copy of dataclass ``cls`` whose choice fields are Enums (recursively through nested dataclasses and
    lists of them): what Hydra validates a composed config against."""
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        tp, optional = _strip_optional(hints[f.name])
        options = f.metadata.get(CHOICES)
        if options is not None:
            # member names = values, so OmegaConf's messages ("expected one of [...]") list the real options
            etype = enum.Enum(f"{cls.__name__}_{f.name}", [(o, o) for o in options])  # type: ignore[misc]
            default = None if f.default is None else etype[str(f.default)]
            specs.append((f.name, etype | None if optional else etype, dataclasses.field(default=default)))
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            sub = schema_of(tp)
            specs.append((f.name, sub, dataclasses.field(default_factory=sub)))
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            sub = schema_of(typing.get_args(tp)[0])
            specs.append((f.name, list[sub], dataclasses.field(default_factory=list)))  # type: ignore[valid-type]
        else:
            fld = (
                dataclasses.field(default_factory=f.default_factory)
                if f.default_factory is not dataclasses.MISSING
                else dataclasses.field(default=f.default)
            )
            specs.append((f.name, hints[f.name], fld))
    return dataclasses.make_dataclass(cls.__name__, specs)


def check_choices(obj: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the key and the allowed values for the first choice field of dataclass
    instance ``obj`` (recursively) whose value is not one of its options."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        options = f.metadata.get(CHOICES)
        if options is not None and value is not None and value not in options:
            raise ValueError(f"{key}={value!r} is not a valid value; choose one of: {', '.join(options)}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_choices(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    check_choices(item, f"{key}[{i}].")
