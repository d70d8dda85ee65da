"""The building blocks of the config sections (``qlorakit.config``): documented fields, the validators that
name the offending field, building a section from a plain mapping and back, and memory sizes.

A validator raises ``ConfigError("<Section>.<field> = <value>: <why>")``; ``from_dict`` rejects unknown keys and
lists the known ones; ``parse_size`` reads ``48GB`` (powers of ten) and ``24GiB`` (powers of two).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import field
from typing import Any, TypeVar

from qlorakit.constants import REPORT_TARGETS
from qlorakit.errors import ConfigError

T = TypeVar("T")


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its documentation (shown by ``qlorakit train --help``)."""
    return field(default=default, metadata={"help": help})


def fail(cls_name: str, name: str, value: Any, why: str) -> None:
    raise ConfigError(f"{cls_name}.{name} = {value!r}: {why}")


def int_field(config: Any, name: str, low: int, why: str = "") -> None:
    """Field ``name`` of ``config`` must be an integer (not a bool) >= ``low``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(type(config).__name__, name, value, why or f"must be an integer >= {low}")


def bool_fields(config: Any, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            fail(type(config).__name__, name, getattr(config, name), "must be true or false")


def report_targets(value: Any) -> tuple[str, ...]:
    """``TrainConfig.report_to`` as a tuple of known tracker names: strings may be comma-separated, "none"
    alone means no tracker, duplicates are dropped (first order kept)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        fail("TrainConfig", "report_to", value, "expected tracker names (a string or a list of strings)")
    names = [n.strip().lower() for v in items for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORT_TARGETS]
    if unknown:
        fail("TrainConfig", "report_to", value, f"unknown tracker {unknown[0]!r}; choose from {tuple(REPORT_TARGETS)}")
    chosen = tuple(dict.fromkeys(n for n in names if n != "none"))
    if chosen and "none" in names:
        fail("TrainConfig", "report_to", value, "'none' cannot be combined with a tracker")
    return chosen or ("none",)


def choice_field(config: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        fail(type(config).__name__, name, getattr(config, name), f"choose one of {choices}")


def from_dict(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys fail listing the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return cls(**dict(values))


def as_dict(config: Any) -> dict[str, Any]:
    """A plain-JSON dict of a config (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


#: Memory size units (``parse_size``): ``GB``/``MB``/``KB`` are powers of ten, ``GiB``/``MiB``/``KiB`` powers of
#: two (a "24 GB" GPU holds 24 GiB, so ``24GB`` is the conservative reading).
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"48GB"`` -> 48,000,000,000 bytes; ``"24GiB"`` -> 24 * 2**30; a bare number is bytes."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS:
        raise ConfigError(
            f"memory size {text!r} is not understood; write a number and a unit, e.g. 48GB, 24GiB, 512MiB"
        )
    value = float(match.group(1)) * UNITS[unit]
    if value <= 0:
        raise ConfigError(f"memory size {text!r} must be positive")
    return int(value)
