"""Parsing a ``[hypervisor.<name>]`` table: typed values, one clear error per bad key.

Theory of operation: a driver describes its section as a frozen dataclass whose fields are
the keys, plus a map ``key -> parser``. `parse_section` runs each present key through its
parser and keeps the keys it does not know in ``unknown_keys`` (reported by the caller with
file and line, not fatal: a configuration written for a newer version still loads). Every
problem is a `ConfigError` naming the section, key, value, why, and how to fix it.
Constructing the dataclass directly performs no checks (tests use ``dataclasses.replace``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, TypeVar

Parser = Callable[[str, object, str], Any]
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which key, why, and how to fix it."""

    def __init__(
        self, section: str, key: str, value: object, problem: str, fix: str, source: str
    ) -> None:
        """Build ``<section>.<key>: <value> <problem>; <fix> (in <source>)``."""
        shown = value if isinstance(value, str) and value.startswith("/") else repr(value)
        super().__init__(f"{section}.{key}: {shown} {problem}; {fix} (in {source})")
        self.section = section
        self.key = key
        self.value = value
        self.source = source


class KeyProblem(ValueError):
    """Raised by parsers; `parse_section` turns it into a `ConfigError` with the section."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def parse_section(
    cls: type[T], section: str, table: Mapping[str, Any], parsers: Mapping[str, Parser],
    source: str,
) -> T:
    """``cls(**parsed values, unknown_keys=...)`` from ``table``."""
    known = {f.name for f in fields(cls)} & parsers.keys()  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key in sorted(known & table.keys()):
        try:
            values[key] = parsers[key](key, table[key], source)
        except KeyProblem as e:
            raise ConfigError(section, key, table[key], e.problem, e.fix, source) from None
    unknown = tuple(sorted(table.keys() - known))
    make: Callable[..., T] = cls
    return make(**values, unknown_keys=unknown)


def need_file(
    section: str, key: str, value: str, fix: str, source: str, exe: bool = False
) -> None:
    """Raise `ConfigError` unless ``value`` is an existing (executable) file."""
    if not os.path.isfile(value):
        raise ConfigError(section, key, value, "does not exist", f"{fix} or fix the path", source)
    if exe and not os.access(value, os.X_OK):
        raise ConfigError(
            section, key, value, "is not executable", f"{fix} or fix the path", source
        )


def string(key: str, value: object, source: str) -> str:
    """Any string."""
    if not isinstance(value, str):
        raise KeyProblem("is not a string", "quote the value")
    return value


def abs_path(key: str, value: object, source: str) -> str:
    """An absolute path."""
    text = string(key, value, source)
    if not text.startswith("/"):
        raise KeyProblem("is not an absolute path", "give a full path")
    return text


def optional_abs_path(key: str, value: object, source: str) -> str:
    """An absolute path, or '' for none."""
    return "" if value == "" else abs_path(key, value, source)


def nonempty(key: str, value: object, source: str) -> str:
    """A string with something in it."""
    text = string(key, value, source)
    if not text.strip():
        raise KeyProblem("is empty", "set a value")
    return text


def boolean(key: str, value: object, source: str) -> bool:
    """true or false."""
    if not isinstance(value, bool):
        raise KeyProblem("is not a boolean", "write true or false")
    return value


def int_at_least(minimum: int) -> Parser:
    """An integer of at least ``minimum``."""

    def parse(key: str, value: object, source: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KeyProblem("is not an integer", "write a plain number")
        if value < minimum:
            raise KeyProblem(f"is below {minimum}", f"use {minimum} or more")
        return value

    return parse


def one_of(choices: tuple[str, ...]) -> Parser:
    """One of ``choices``."""

    def parse(key: str, value: object, source: str) -> str:
        if value not in choices:
            wanted = ", ".join(f'"{c}"' for c in choices)
            raise KeyProblem("is not a valid choice", f"use one of {wanted}")
        return str(value)

    return parse


def str_list(key: str, value: object, source: str) -> tuple[str, ...]:
    """A list of strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise KeyProblem("is not a list of strings", 'write ["a", "b"]')
    return tuple(value)
