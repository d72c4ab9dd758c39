"""Reading a YAML recipe plus command-line overrides into the argument dataclasses.

``HfArgumentParser.parse_yaml_file`` reads a YAML file but does not merge command-line
overrides; here the YAML values become the parser's defaults and the command line wins, as in
TRL's parser. Unknown keys, in the file or on the command line, are errors.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from stim_hf.errors import ConfigError


def load_recipe(config_path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a dict of field: value, with a clear error for a missing or broken file.

    Shared by ``stim-hf train`` (every key) and ``stim-hf export`` / ``loafing`` (the data fields
    and seed of the training recipe).
    """
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file '{config_path}' does not exist; give the path of a YAML recipe (see configs/)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{config_path}' is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file '{config_path}' must hold a mapping of field: value, not {type(values).__name__}"
        )
    return values


class StimArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` that takes an optional YAML recipe as first argument."""

    def __init__(self, dataclass_types, **kwargs) -> None:
        # No abbreviations: '--num_subnet' must be an error, not a silent '--num_subnets'.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(dataclass_types, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise argparse's errors (a value of the wrong type, a missing value) as one-line ConfigErrors.

        argparse would print the whole usage (hundreds of lines with TrainingArguments) and exit.
        """
        raise ConfigError(f"{message} (from the recipe or the command line); see --help for the accepted values")

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``[CONFIG.yaml] [--field value ...]`` into one instance of each dataclass.

        Values from the YAML file are defaults; command-line flags override them.
        """
        argv = list(sys.argv[1:] if args is None else args)
        if argv and not argv[0].startswith("-"):
            config_path, argv = argv[0], argv[1:]
            self._set_yaml_defaults(config_path)
        argv = self._apply_null_overrides(argv)
        *dataclasses_, remaining = self.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if remaining:
            unknown = [a for a in remaining if a.startswith("--")] or remaining
            raise ConfigError(f"unknown command-line argument(s) {unknown}{self._suggest(unknown)}; see --help")
        return tuple(dataclasses_)

    def known_fields(self) -> dict[str, Any]:
        """Every field name the parser accepts, mapped to its dataclass field."""
        return {f.name: f for dtype in self.dataclass_types for f in fields(dtype) if f.init}

    def _apply_null_overrides(self, argv: list[str]) -> list[str]:
        """``--field null`` unsets a field the recipe set (e.g. swap train_file for dataset_name); "none" stays a value."""
        known, kept, i = self.known_fields(), [], 0
        while i < len(argv):
            name = argv[i][2:] if argv[i].startswith("--") else None
            if name in known and i + 1 < len(argv) and argv[i + 1] in ("null", "~"):
                self.set_defaults(**{name: None})
                i += 2
                continue
            kept.append(argv[i])
            i += 1
        return kept

    def _set_yaml_defaults(self, config_path: str) -> None:
        values = load_recipe(config_path)
        known = self.known_fields()
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in '{config_path}'{self._suggest(unknown)}")
        # argparse converts string defaults with the field's type, so scalars go in as text
        # (YAML 1.1 reads 1e-4 as a string, 0.1 as a float: both end up as the field's type).
        self.set_defaults(**{k: _as_default(v) for k, v in values.items()})

    def _suggest(self, names: Sequence[str]) -> str:
        known = list(self.known_fields())
        hints = []
        for name in names:
            close = difflib.get_close_matches(name.lstrip("-").split("=")[0], known, n=1)
            if close:
                hints.append(f"'{name}' -> '{close[0]}'")
        return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def _as_default(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return value
