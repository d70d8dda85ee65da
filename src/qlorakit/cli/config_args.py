"""Command-line flags generated from the ``RunConfig`` dataclasses, and the config-file loader.

Precedence: dataclass defaults < ``--config FILE`` (YAML or JSON, nested by section) < flags. Every flag's
help text and default come from the field itself, so the documentation has one home. A flag is
``--<field>`` whatever its section (``--lr`` sets ``optim.lr``, ``--eval-steps`` ``eval.eval_steps``), except
``--lora-<field>`` and the names in ``SPECIAL_FLAGS``; the flag names predate the sections and stay as they are.
A file in the layout before the sections (optimizer, memory and evaluation keys under ``train:``) is
upgraded as it is read (``config.upgrade_layout``, with one deprecation message).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from qlorakit.config import SECTIONS, RunConfig, parse_targets, upgrade_layout
from qlorakit.errors import ConfigError

#: Flags whose name is not ``--<field>`` (or ``--lora-<field>`` for the LoRA section).
SPECIAL_FLAGS = {
    ("quant", "quant_type"): "--quant-type",
    ("quant", "blocksize"): "--quant-blocksize",
    ("quant", "double_quant"): "--double-quant",
    ("data", "paths"): "--data",
    ("data", "seed"): "--data-seed",
}


def flag_name(section: str, name: str) -> str:
    if (section, name) in SPECIAL_FLAGS:
        return SPECIAL_FLAGS[(section, name)]
    prefix = "lora-" if section == "lora" else ""
    return "--" + prefix + name.replace("_", "-")


def dest_name(section: str, name: str) -> str:
    return f"cfg__{section}__{name}"


def _arg_kwargs(f: dataclasses.Field, default: Any) -> dict[str, Any]:
    shown = ",".join(default) if isinstance(default, tuple) else default
    kwargs: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")}
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.name == "paths":
        kwargs.update(nargs="+", metavar="FILE")
    elif f.name == "report_to":
        kwargs.update(action="append", metavar="TRACKER")  # repeatable; each may be comma-separated
    elif f.name == "targets":
        kwargs.update(type=parse_targets, metavar="SPEC")
    elif isinstance(default, (int, float, str)):
        kwargs["type"] = type(default)
    return kwargs


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by section; argparse defaults stay unset (SUPPRESS)."""
    parser.add_argument("--model", default=argparse.SUPPRESS, dest="cfg__model",
                        help=f"{RunConfig.__dataclass_fields__['model'].metadata['help']} "
                             f"(default: {RunConfig().model})")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        defaults = cls()
        for f in dataclasses.fields(cls):
            group.add_argument(flag_name(section, f.name), dest=dest_name(section, f.name), default=argparse.SUPPRESS,
                               **_arg_kwargs(f, getattr(defaults, f.name)))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A nested mapping from a YAML (.yaml/.yml) or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"config file {path}: cannot parse ({exc})") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return upgrade_layout(values, f"config file {path}")


def merge_flags(base: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Overlay the flags the user gave onto ``base`` (a nested mapping)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg__"):
            continue
        parts = dest.split("__")
        if len(parts) == 2:
            merged[parts[1]] = value
        else:
            merged.setdefault(parts[1], {})[parts[2]] = list(value) if isinstance(value, tuple) else value
    return merged


def run_config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """defaults < ``base`` (e.g. a resumed run's config.yaml) < ``--config`` file < flags."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        file_values = load_config_file(args.config)
        for key, value in file_values.items():
            values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return RunConfig.from_mapping(merge_flags(values, args), where=getattr(args, "config", None) or "flags")


def dump_yaml(config: RunConfig) -> str:
    import yaml

    from qlorakit.config import as_dict

    return yaml.safe_dump(as_dict(config), sort_keys=False)
