"""Pod annotations that change the hypervisor: honoured only where the configuration says.

A pod may carry ``io.katacontainers.config.hypervisor.<key>=<value>`` (CRI passes it on
when the runtime handler's ``pod_annotations`` lists ``io.katacontainers.*``). As in Kata:

* ``<key>`` must be matched (whole, as a regular expression) by an entry of the section's
  ``enable_annotations``; nothing is enabled by default;
* a key that names a file the host runs or hands to the VM (``path``, ``kernel``,
  ``initrd``, ``image``, ``virtio_fs_daemon``) must also match a glob of
  ``valid_hypervisor_paths``;
* keys that guard the host (``enable_annotations``, ``valid_hypervisor_paths``,
  ``allow_tcg``, ``seccompsandbox``) can never come from a pod;
* the value is parsed and checked by the same parser as the configuration file's;
  ``kernel_params`` are added to the configured ones, every other value replaces its key's.

Any refusal is an `AnnotationError` naming the annotation and the rule it broke; a pod is
refused as a whole, never half-applied. Pure: no IO.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import posixpath
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from hypervisors.config import ConfigError, Parser, abs_path, optional_abs_path

PREFIX = "io.katacontainers.config.hypervisor."
NEVER_FROM_A_POD = frozenset({"enable_annotations", "valid_hypervisor_paths", "allow_tcg",
                              "seccompsandbox"})
PATH_PARSERS = (abs_path, optional_abs_path)
APPENDED = frozenset({"kernel_params"})
MAX_VALUE = 4096
T = TypeVar("T")


class AnnotationError(ValueError):
    """A pod annotation that the configuration does not allow; the message says why."""


def hypervisor_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """``<key>: value`` of the pod's hypervisor annotations."""
    return {name.removeprefix(PREFIX): value for name, value in annotations.items()
            if name.startswith(PREFIX)}


def apply(config: T, annotations: Mapping[str, str], parsers: Mapping[str, Parser],
          section: str, source: str) -> T:
    """`config` (a dataclass with ``enable_annotations`` and ``valid_hypervisor_paths``)
    with the pod's allowed hypervisor annotations applied."""
    wanted = hypervisor_annotations(annotations)
    if not wanted:
        return config
    enabled: tuple[str, ...] = getattr(config, "enable_annotations")  # noqa: B009
    valid_paths: tuple[str, ...] = getattr(config, "valid_hypervisor_paths")  # noqa: B009
    fields = {f.name: f for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, text in sorted(wanted.items()):
        name = PREFIX + key
        if key in NEVER_FROM_A_POD or key not in parsers or key not in fields:
            raise AnnotationError(f"annotation {name}: {key!r} is not a hypervisor setting a "
                                  "pod may change")
        if not any(_fullmatch(pattern, key) for pattern in enabled):
            raise AnnotationError(
                f"annotation {name} is not enabled: enable_annotations in [{section}] of "
                f"{source} has no entry matching {key!r}")
        if len(text) > MAX_VALUE:
            raise AnnotationError(f"annotation {name}: value longer than {MAX_VALUE} bytes")
        value = _typed(name, text, fields[key].default)
        try:
            values[key] = parsers[key](key, value, source)
        except ConfigError as e:
            raise AnnotationError(f"annotation {name}: {e}") from None
        except ValueError as e:  # a parser's complaint: its problem and how to fix it
            fix = getattr(e, "fix", "")
            raise AnnotationError(f"annotation {name}: {text!r} {e}"
                                  + (f"; {fix}" if fix else "")) from None
        if key in APPENDED:  # added to the configuration's, as Kata does
            values[key] = f"{getattr(config, key)} {values[key]}".strip()
        if parsers[key] in PATH_PARSERS and values[key]:
            _check_path(name, values[key], valid_paths, section, source)
    return dataclasses.replace(config, **values)  # type: ignore[type-var]


def _fullmatch(pattern: str, key: str) -> bool:
    try:
        return re.fullmatch(pattern, key) is not None
    except re.error:
        return False  # a broken pattern enables nothing


def _typed(name: str, text: str, default: object) -> object:
    """The annotation's text as the type the configuration file would give."""
    if isinstance(default, bool):
        if text not in ("true", "false"):
            raise AnnotationError(f"annotation {name}: {text!r} is not true or false")
        return text == "true"
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise AnnotationError(f"annotation {name}: {text!r} is not an integer") from None
    if isinstance(default, tuple):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise AnnotationError(f'annotation {name}: give a JSON list of strings, like '
                                  f'["a", "b"], not {text!r}')
        return items
    return text


def _check_path(name: str, path: str, valid: tuple[str, ...], section: str,
                source: str) -> None:
    if posixpath.normpath(path) != path:  # "/usr/bin/../../tmp/x" would match "/usr/bin/*"
        raise AnnotationError(f"annotation {name}: {path} is not a normalised absolute path")
    if not any(fnmatch.fnmatchcase(path, glob) for glob in valid):
        allowed = ", ".join(valid) if valid else "nothing (it is empty)"
        raise AnnotationError(
            f"annotation {name}: {path} is not allowed: valid_hypervisor_paths in "
            f"[{section}] of {source} allows {allowed}")
