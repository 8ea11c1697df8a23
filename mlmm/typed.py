"""Typed dataclasses from plain mappings (YAML sections), and dotted command-line overrides.

    cfg = from_dict(TrainConfig, {"lr": 1e-3}, "train")     # keys, types, RANGES, then cfg.validate("train")
    raw = apply_overrides(raw, ["train.max_steps=50"])       # values parsed as YAML scalars

Every problem raises :class:`ConfigError` naming the dotted key. :mod:`mlmm.config` builds the run config with these.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from mlmm.ranges import check_ranges


class ConfigError(ValueError):
    """A configuration problem, reported as ``<file>: <dotted.key>: <what is wrong>``."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; build nested dataclasses. Raises ConfigError(key: ...)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; `prefix` names the section."""
    if hasattr(cls, "gather_sections"):  # sections named by a registry rather than by fields (ModelConfig)
        data = cls.gather_sections(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            near = [n for n in names if n.startswith(str(k)[:3])]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{prefix + '.' if prefix else ''}{k}: unknown key{hint}")
    kwargs = {k: coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    check_ranges(obj, prefix)
    if hasattr(obj, "validate"):
        obj.validate(prefix or cls.__name__)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.max_steps=50' -> (['train', 'max_steps'], 50); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"{text}: overrides look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key.strip()}: value {raw!r} is not valid YAML: {' '.join(str(e).split())}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node[path[-1]] = value
    return raw
