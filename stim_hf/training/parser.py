"""Reading a YAML recipe plus command-line overrides into the argument dataclasses.

``HfArgumentParser.parse_yaml_file`` reads a YAML file but does not merge command-line
overrides; here the YAML values become the parser's defaults and the command line wins, as in
TRL's parser. Unknown keys, in the file or on the command line, are errors, and so is a key the
file sets twice.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from stim_hf.data.image_datasets import DataArguments
from stim_hf.errors import ConfigError

TRAIN_USAGE = "%(prog)s RECIPE.yaml [--field value ...]\n       %(prog)s --config RECIPE.yaml [--field value ...]"
TRAIN_DESCRIPTION = (
    "Train a residual network stimulatively. RECIPE.yaml (first, or after --config) is a YAML mapping of "
    "field: value (see configs/); every field below can also be given on the command line as --field value, "
    "--field-name value or --field=value, which overrides the recipe. --field null unsets a value the recipe set."
)
NULL_SPELLINGS = ("null", "~")


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping sets the same key twice (``yaml.safe_load`` would keep the last value silently)."""

    def __init__(self, key: Any, first_line: int, second_line: int) -> None:
        super().__init__(f"key '{key}' appears twice (lines {first_line} and {second_line})")
        self.key, self.first_line, self.second_line = key, first_line, second_line


class UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` for a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Check the mapping's own keys (merged ``<<`` keys may be overridden, as YAML intends), then build it."""
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise DuplicateKeyError(key, first_lines[key], line)
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def load_recipe(config_path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a dict of field: value, with a clear error for a missing or broken file.

    Shared by ``stim-hf train`` (every key) and ``stim-hf export`` / ``loafing`` (the data fields
    and seed of the training recipe). A key set twice is an error, not "the last one wins".
    """
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file '{config_path}' does not exist; give the path of a YAML recipe (see configs/)")
    try:
        values = yaml.load(path.read_text(), Loader=UniqueKeySafeLoader) or {}
    except DuplicateKeyError as err:
        raise ConfigError(
            f"config file '{config_path}' sets '{err.key}' twice (lines {err.first_line} and {err.second_line}); "
            "keep one of them"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{config_path}' is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file '{config_path}' must hold a mapping of field: value, not {type(values).__name__}"
        )
    return values


def split_recipe_path(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take the recipe out of ``argv``: a first argument that is not a flag, or ``--config PATH`` / ``--config=PATH``.

    Returns the recipe path (None without one) and the other arguments, in order.
    """
    paths, rest = [], []
    if argv and not argv[0].startswith("-"):
        paths.append(argv[0])
        argv = argv[1:]
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 == len(argv) or argv[i + 1].startswith("-"):
                raise ConfigError("--config needs the path of a YAML recipe (--config RECIPE.yaml)")
            paths.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--config="):
            paths.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    if len(paths) > 1:
        raise ConfigError(
            f"more than one recipe given ({', '.join(paths)}); give one, either first (RECIPE.yaml) or as "
            "--config RECIPE.yaml"
        )
    return (paths[0] if paths else None), rest


def allows_none(annotation: Any) -> bool:
    """Whether a field annotated ``annotation`` may hold None (``X | None``, ``Optional[X]``, ``Any``)."""
    if annotation is Any or annotation is type(None):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return type(None) in typing.get_args(annotation)
    return False


class StimArgumentParser(HfArgumentParser):
    """The ``stim-hf train`` parser: an optional YAML recipe, then ``--field value`` overrides."""

    help_hint = "--help"  # where an error message sends the user

    def __init__(self, dataclass_types, **kwargs) -> None:
        # No abbreviations: '--num_subnet' must be an error, not a silent '--num_subnets'.
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("prog", "stim-hf train")
        kwargs.setdefault("usage", TRAIN_USAGE)
        kwargs.setdefault("description", TRAIN_DESCRIPTION)
        super().__init__(dataclass_types, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise argparse's errors (a value of the wrong type, a missing value) as one-line ConfigErrors.

        argparse would print the whole usage (hundreds of lines with TrainingArguments) and exit.
        """
        raise ConfigError(f"{message} (from the recipe or the command line); see --help for the accepted values")

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``[RECIPE.yaml | --config RECIPE.yaml] [--field value ...]`` into one instance of each dataclass.

        Values from the YAML file are defaults; command-line flags override them. Unknown arguments
        are reported before any dataclass checks its values.
        """
        recipe, argv = split_recipe_path(list(sys.argv[1:] if args is None else args))
        if recipe is not None:
            self._set_yaml_defaults(recipe)
        argv = self._apply_null_overrides(argv)
        namespace, remaining = self.parse_known_args(argv)
        self.refuse_unknown(remaining)
        return self._dataclasses_from(namespace)

    def refuse_unknown(self, remaining: Sequence[str]) -> None:
        """Raise a :class:`ConfigError` naming the unknown arguments, with the closest known fields."""
        if remaining:
            unknown = [arg for arg in remaining if arg.startswith("--")] or list(remaining)
            raise ConfigError(
                f"unknown command-line argument(s) {unknown}{self._suggest(unknown)}; see {self.help_hint}"
            )

    def known_fields(self) -> dict[str, Any]:
        """Every field name the parser accepts, mapped to its dataclass field."""
        return {f.name: f for dtype in self.dataclass_types for f in fields(dtype) if f.init}

    def nullable_fields(self) -> set[str]:
        """The names of the fields whose type admits None, i.e. that a recipe or ``--field null`` may unset."""
        # From the annotations: HfArgumentParser strips None from the dataclass fields' ``type``.
        return {
            name
            for dtype in self.dataclass_types
            for name, annotation in typing.get_type_hints(dtype).items()
            if allows_none(annotation)
        }

    def _apply_null_overrides(self, argv: list[str]) -> list[str]:
        """``--field null`` (also ``--field-name null``, ``--field=null``) unsets a field the recipe set.

        The null arguments are taken out of ``argv`` and become None defaults; "none" stays a value.
        """
        kept, nulled, i = [], [], 0
        while i < len(argv):
            option, equals, inline_value = argv[i].partition("=")
            name = self._field_taking_value(option)
            value = inline_value if equals else (argv[i + 1] if i + 1 < len(argv) else None)
            if name is not None and value in NULL_SPELLINGS:
                nulled.append(name)
                i += 1 if equals else 2
                continue
            kept.append(argv[i])
            i += 1
        self._check_unset_fields(nulled)
        self._check_not_also_given(nulled, kept)
        self.set_defaults(**dict.fromkeys(nulled))
        return kept

    def _field_taking_value(self, option: str) -> str | None:
        """The dataclass field that the option string ``option`` sets with a value (None for other strings)."""
        action = self._option_string_actions.get(option) if option.startswith("--") else None
        if action is None or action.nargs == 0 or action.dest not in self.known_fields():
            return None
        return action.dest

    def _check_unset_fields(self, names: Sequence[str], where: str = "") -> None:
        nullable = self.nullable_fields()
        for name in names:
            if name not in nullable:
                raise ConfigError(f"{name} cannot be unset (null){where}: it needs a value; give one or leave it out")

    def _check_not_also_given(self, nulled: Sequence[str], argv: Sequence[str]) -> None:
        given = {self._field_taking_value(arg.partition("=")[0]) for arg in argv}
        for name in nulled:
            if name in given:
                raise ConfigError(f"{name} is given both null and a value on the command line; give it once")

    def _set_yaml_defaults(self, config_path: str) -> None:
        values = load_recipe(config_path)
        known = self.known_fields()
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in '{config_path}'{self._suggest(unknown)}")
        self._check_unset_fields([k for k, v in values.items() if v is None], where=f" in '{config_path}'")
        # argparse converts string defaults with the field's type, so scalars go in as text
        # (YAML 1.1 reads 1e-4 as a string, 0.1 as a float: both end up as the field's type).
        self.set_defaults(**{k: _as_default(v) for k, v in values.items()})

    def _dataclasses_from(self, namespace: argparse.Namespace) -> tuple[Any, ...]:
        """One instance of each dataclass from the parsed values (this is where the dataclasses validate)."""
        values = vars(namespace)
        return tuple(
            dtype(**{f.name: values[f.name] for f in fields(dtype) if f.init and f.name in values})
            for dtype in self.dataclass_types
        )

    def _suggest(self, names: Sequence[str]) -> str:
        known = list(self.known_fields())
        hints = []
        for name in names:
            dashes = "--" if name.startswith("--") else ""
            close = difflib.get_close_matches(name.lstrip("-").split("=")[0].replace("-", "_"), known, n=1)
            if close:
                hints.append(f"'{name}' -> '{dashes}{close[0]}'")
        return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def _as_default(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return value


class SubcommandArgumentParser(StimArgumentParser):
    """The parser of ``stim-hf export`` and ``stim-hf loafing``, which take paths as positional arguments.

    Like ``stim-hf train``'s: an argparse error (a value of the wrong type, a missing value) is a
    one-line :class:`ConfigError`, and :meth:`refuse_unknown` suggests the closest known field. A
    value that starts with '-' (``--depths -1,2,2``) is taken as the option's value, not as an option.
    """

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        # argparse writes the usage from the arguments; StimArgumentParser's usage is stim-hf train's.
        kwargs.setdefault("usage", None)
        kwargs.setdefault("description", None)
        super().__init__(dataclass_types, **kwargs)
        self.help_hint = f"'{self.prog} --help'"

    def parse_with_recipe(self, argv: Sequence[str], renamed: Mapping[str, str]) -> Any:
        """Parse ``argv``; with ``--config RECIPE.yaml`` the recipe's values (:func:`recipe_defaults`) become the
        defaults the command line overrides. Unknown options are refused (:meth:`refuse_unknown`)."""
        namespace, remaining = self.parse_known_args(argv)
        if namespace.config:
            self.set_defaults(**recipe_defaults(load_recipe(namespace.config), renamed))
            namespace, remaining = self.parse_known_args(argv)
        self.refuse_unknown(remaining)
        return namespace

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """``ArgumentParser.parse_known_args`` after :meth:`attach_dash_values`."""
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.attach_dash_values(argv), namespace)

    def attach_dash_values(self, argv: Sequence[str]) -> list[str]:
        """``--option -1,2,2`` written as ``--option=-1,2,2`` for options that take one value.

        argparse reads a token that starts with '-' as an option unless it is a plain negative
        number, so ``--depths -1,2,2`` would fail with "expected one argument" before validation.
        """
        takes_one_value = {
            option for action in self._actions if action.nargs is None for option in action.option_strings
        }
        attached: list[str] = []
        for arg in argv:
            previous = attached[-1] if attached else None
            if previous in takes_one_value and _looks_like_value(arg, self._option_string_actions):
                attached[-1] = f"{previous}={arg}"
            else:
                attached.append(arg)
        return attached


def _looks_like_value(arg: str, options: dict[str, Any]) -> bool:
    """A token starting with a single '-' that is no option of the parser (``-1,2,2``, ``-0.5``)."""
    return arg.startswith("-") and not arg.startswith("--") and arg.split("=", 1)[0] not in options


def as_parser_default(value: Any) -> Any:
    """A recipe value as a subcommand parser's default: the string its command line would give."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, (int, float)):
        return str(value)
    return value


def recipe_defaults(recipe: Mapping[str, Any], renamed: Mapping[str, str]) -> dict[str, Any]:
    """A training recipe's values as a subcommand parser's defaults, so a user gives the run's data once.

    The recipe's data fields (:class:`~stim_hf.data.DataArguments`) keep their names; the keys of
    ``renamed`` become the subcommand's own names (``subnet_bn_recalibration_samples`` ->
    ``recalibrate_bn``). Values the recipe leaves unset are left out, so the parser's own defaults hold.
    """
    data_fields = {f.name for f in fields(DataArguments) if f.init}
    defaults = {key: as_parser_default(value) for key, value in recipe.items() if key in data_fields}
    defaults |= {renamed[key]: as_parser_default(value) for key, value in recipe.items() if key in renamed}
    return {key: value for key, value in defaults.items() if value is not None}
