"""Config dataclasses as the schema: what Hydra types, how options become a checked dataclass, and errors.

Every config of rl4diffusion is a dataclass with a docstring per field (``TrainConfig``,
``PolicyConfig``, each algorithm's ``XxxConfig``). Checking is split by concern, each in one place:

* **keys and types** — the dataclass's annotations. Hydra checks them while it composes (the
  dataclasses sit in its ConfigStore, see ``hydra_node``); Python callers get the same check from
  ``instantiate``. ``Literal[...]`` choices count as types (``check_choices``).
* **ranges and cross-field rules** — the dataclass's own ``validate()``.

OmegaConf types neither ``Literal`` nor ``Sequence``; ``hydra_node`` hands it ``str`` and ``list``
in their place, and ``check_choices`` checks the choices from the annotation itself.

Example::

    cfg = instantiate(DDPOConfig, {"lr": "1e-4"}, prefix="algo", owner="algo=ddpo")  # lr == 1e-4, validated
    instantiate(DDPOConfig, {"lr": "fast"}, prefix="algo", owner="algo=ddpo")  # ConfigError: algo.lr must be a number …
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Union

from rl4diffusion.errors import ConfigError

T = TypeVar("T")


# ---------------------------------------------------------------------------------------- the node Hydra sees
@functools.cache
def hydra_node(cls: type, name: str | None = None) -> type:
    """``cls`` as a dataclass OmegaConf can type: the same fields, defaults and order, ``Literal`` → ``str``,
    ``Sequence``/``tuple`` → ``list``, nested dataclasses likewise. With ``name``, a first field ``name`` of that
    default (the option an algorithm is selected by, ``algo.name``)."""
    hints = typing.get_type_hints(cls)
    fields = [("name", str, dataclasses.field(default=name))] if name is not None else []
    for f in dataclasses.fields(cls):
        kind = _omegaconf_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
            spec = dataclasses.field(default_factory=lambda d=default: list(d)) if isinstance(default, tuple) else (
                dataclasses.field(default=default))
        elif dataclasses.is_dataclass(hints[f.name]) and f.default_factory is hints[f.name]:
            spec = dataclasses.field(default_factory=kind)
        else:
            spec = dataclasses.field(default_factory=f.default_factory)
        fields.append((f.name, kind, spec))
    return dataclasses.make_dataclass(cls.__name__, fields)


def _omegaconf_type(kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return type(args[0])
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _omegaconf_type(inner[0]) | None if len(inner) == 1 else Any
    if origin in (list, tuple, Sequence):
        return list[_omegaconf_type(args[0])] if args else list
    if dataclasses.is_dataclass(kind):
        return hydra_node(kind)
    return kind


# ---------------------------------------------------------------------------------------- options → dataclass
def instantiate(cls: type[T], options: dict, *, prefix: str, owner: str) -> T:
    """Build ``cls`` from plain options and check it: unknown keys, types, choices, then ``validate()``.

    Args:
        cls: a config dataclass.
        options: its fields by name (a missing one takes its default).
        prefix: where the options live in the training config, for messages (``"algo"``, ``"model"``, ``""``).
        owner: what the options configure, for messages (``"algo=ddpo"``).
    Raises:
        ConfigError naming the key, what it must be and how to fix it.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) for {owner}: {', '.join(unknown)}. Valid options: {', '.join(sorted(valid))}.")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(hydra_node(cls)), options)
        values = OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise config_error(e, prefix=prefix) from None
    config = _build(cls, values)
    check(config, prefix)
    return config


def _build(cls: type, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{
        k: _build(hints[k], v) if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) else v
        for k, v in values.items()
    })


def check(config: Any, prefix: str = "") -> None:
    """Check a built config dataclass: its ``Literal`` choices, then its ``validate()``; nested dataclasses first."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check(value, _join(prefix, f.name))
    check_choices(config, prefix)
    if hasattr(config, "validate"):
        config.validate()


def check_choices(config: Any, prefix: str = "") -> None:
    """Raise ConfigError for a field annotated ``Literal[...]`` (or ``Literal[...] | None``) holding another value."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kind, value = hints[f.name], getattr(config, f.name)
        if typing.get_origin(kind) in (Union, types.UnionType):
            if value is None and type(None) in typing.get_args(kind):
                continue
            kind = next((a for a in typing.get_args(kind) if typing.get_origin(a) is Literal), kind)
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            choices = ", ".join(str(c) for c in typing.get_args(kind))
            raise ConfigError(f"{_join(prefix, f.name)} must be one of {choices}; got {value!r}.")


def at_least(*checks: tuple[str, Any, float, str]) -> None:
    """Raise ConfigError for the first ``(key, value, minimum, what it is)`` below its minimum (None = unset).

    NaN is below every minimum: ``nan < 0`` is False, so a plain comparison would let it through."""
    for key, value, minimum, what in checks:
        if value is not None and (value != value or value < minimum):
            raise ConfigError(f"{key} ({what}) must be a number ≥ {minimum}, got {value}.")


def finite(*checks: tuple[str, Any, str]) -> None:
    """Raise ConfigError for the first ``(key, value, what it is)`` that is NaN or infinite (None = unset)."""
    for key, value, what in checks:
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{key} ({what}) must be a finite number, got {value}: NaN and infinity poison every "
                              f"sample. Set {key} to a finite value.")


# ---------------------------------------------------------------------------------------- errors
def config_error(error: BaseException, *, prefix: str = "") -> ConfigError:
    """One paragraph for an OmegaConf/Hydra error: the key, what it must be and how to fix it.

    ``prefix`` is where the failing config sits in the training config (its errors name keys relative to it).
    """
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

    cause = error
    while not getattr(cause, "full_key", None) and cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).splitlines()[0].strip().rstrip(".")
    if not getattr(cause, "full_key", None):
        return ConfigError(f"bad override: {text}.")
    key, node = _join(prefix, cause.full_key), getattr(cause, "object_type", None)
    if isinstance(cause, MissingMandatoryValue):
        hint = " (model=path:/dir fills it)" if key == "model.pretrained" else ""
        return ConfigError(f"{key} has no value (???): set it with {key}=…{hint}.")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        parent = key.rpartition(".")[0]
        if dataclasses.is_dataclass(node):
            valid = ", ".join(f.name for f in dataclasses.fields(node))
            return ConfigError(f"bad override: {key} is not a key of {node.__name__} ({parent or 'the training config'}). "
                               f"Valid keys: {valid}.")
        return ConfigError(f"bad override: {key} is not in the config, and {parent or 'the config'} is free-form: add "
                           f"a key with +{key}=… (a reward's options are its function's keyword arguments).")
    if isinstance(cause, ValidationError) and dataclasses.is_dataclass(node):
        expected = _describe(typing.get_type_hints(node).get(cause.key))
        if expected:
            return ConfigError(f"bad override: {key} must be {expected}, got {cause.value!r}.")
    return ConfigError(f"bad override: {key}: {text}.")


def _describe(kind: Any) -> str | None:
    """How a message says what a value of this (OmegaConf-typed) annotation must be."""
    words = {int: "an integer (int)", float: "a number (float)", bool: "true or false (bool)", str: "a string (str)"}
    if kind in words:
        return words[kind]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (Union, types.UnionType) and len(args) == 1:
        inner = _describe(args[0])
        return inner and f"{inner} or null"
    if kind is list or typing.get_origin(kind) is list:
        return "a list such as [a,b]"
    if dataclasses.is_dataclass(kind):
        return f"a mapping of {kind.__name__}'s keys"
    return None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else prefix or key
