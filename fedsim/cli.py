"""Command-line helpers that ``fedsim.run``, ``fedsim.sweep`` and ``fedsim.recipes`` share: the
one-line-error parser, one flag per ``Config`` field, and values as flags write them."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import FIELD_TYPES, Config, ConfigError

#: extra spellings of a setting's flag
ALIASES = {"algorithms": ("--compare", "--algorithm")}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that points to ``--help`` (not the usage
    block)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_settings(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per ``Config`` field (kebab case, with its help and default)."""
    parser.add_argument("--config", type=Path, help="TOML file of settings (flags override it)")
    settings = parser.add_argument_group("settings (TOML keys: the names with underscores)")
    for f in dataclasses.fields(Config):
        hint = FIELD_TYPES[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + ("" if f.default is None else f" (default: {show_value(f.default)})")
        if f.metadata["choices"]:
            help_text += f"; one of: {', '.join(f.metadata['choices'])}"
        if hint is bool:
            settings.add_argument(flag, action=argparse.BooleanOptionalAction, dest=f.name, help=help_text)
        else:
            settings.add_argument(flag, *ALIASES.get(f.name, ()), dest=f.name, help=help_text,
                                  type=_parser_for(hint), metavar=f.name.upper())


def parse_value(hint: Any, text: str) -> Any:
    """``text`` as a value of a field typed ``hint`` (as its flag parses it), or ConfigError."""
    if hint is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"{text!r} is not true or false")
        return text.lower() == "true"
    try:
        return _parser_for(hint)(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a value of type {_type_name(hint)}") from None


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"list of {args[0].__name__}"
    return (args[0] if args else hint).__name__


def _parser_for(hint: Any) -> Callable[[str], Any]:
    """str -> value for a field's type (``X | None`` parses as X; a tuple from a comma-separated
    list); Config then checks the value. Its ``__name__`` is what argparse calls the type in an
    error (``invalid list of int value: 'a,b'``)."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]

        def parse(text: str) -> tuple:
            return tuple(item(v.strip()) for v in text.split(",") if v.strip())
        parse.__name__ = f"list of {item.__name__}"
        return parse
    return typing.get_args(hint)[0] if typing.get_args(hint) else hint


def show_value(value: Any) -> str:
    """A setting's value as its flag takes it (a list comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def at_least_one(text: str) -> int:
    """An integer ≥ 1 (an argparse ``type``)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)
