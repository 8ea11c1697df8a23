"""Declared ranges of numeric config fields, checked by the generic loader (:func:`mlmm.config.from_dict`).

    @dataclass
    class MyLossConfig:
        temperature: float = 0.07
        margins: dict = field(default_factory=dict)
        RANGES: ClassVar[dict] = {"temperature": "> 0", "margins": ">= 0"}

A range is ``>= a``, ``> a``, ``<= a``, ``< a``, an interval ``[a, b]`` / ``(a, b)`` / ``[a, b)`` / ``(a, b]``, or
``any``; every value must also be finite. A list / tuple field has each element checked, a dict field each value;
``None`` (an unset Optional) passes. Every numeric field of every mlmm config dataclass declares one
(``tests/test_config_ranges.py`` walks them all).
"""
from __future__ import annotations

import math
import re
from typing import Any

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


def parse_range(spec: str) -> tuple[float, bool, float, bool]:
    """``">= 1"`` / ``"(0, 1]"`` / ``"any"`` -> (low, low inclusive, high, high inclusive)."""
    spec = spec.strip()
    if spec == "any":
        return -math.inf, False, math.inf, False
    if m := _BOUND.match(spec):
        op, x = m.group(1), float(m.group(2))
        return (x, op == ">=", math.inf, False) if op in (">=", ">") else (-math.inf, False, x, op == "<=")
    if m := _INTERVAL.match(spec):
        return float(m.group(2)), m.group(1) == "[", float(m.group(3)), m.group(4) == "]"
    raise ValueError(f"range {spec!r}: expected '>= a', '> a', '<= a', '< a', '[a, b]' (or with parentheses) or 'any'")


def check_value(value: Any, spec: str, key: str) -> None:
    """Raise ConfigError(``key: must be ...``) for ``value`` (a number, or a list / tuple / dict of numbers) outside
    range ``spec`` or not finite."""
    from mlmm.config import ConfigError

    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_value(v, spec, f"{key}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            check_value(v, spec, f"{key}.{k}")
        return
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    lo, lo_in, hi, hi_in = parse_range(spec)
    outside = value < lo or value > hi or (value == lo and not lo_in) or (value == hi and not hi_in)
    if not math.isfinite(value) or outside:
        want = "a finite number" if spec.strip() == "any" else (spec if spec[0] in "<>" else f"in {spec}")
        raise ConfigError(f"{key}: must be {want}, got {value!r}")


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check every field of config dataclass ``obj`` that its class's ``RANGES`` names."""
    for name, spec in getattr(type(obj), "RANGES", {}).items():
        check_value(getattr(obj, name), spec, f"{prefix}.{name}" if prefix else name)
