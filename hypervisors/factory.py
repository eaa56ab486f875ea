"""Choosing the hypervisor: ``[hypervisor.<name>]`` -> the package ``hypervisors.<name>``.

A second hypervisor is a new package under ``hypervisors/`` exporting ``DRIVER`` (a
`hypervisors.base.HypervisorDriver`); nothing else changes. The configuration names it by
its section: exactly one ``[hypervisor.<name>]`` table must be present.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import hypervisors
from hypervisors.config import ConfigError

if TYPE_CHECKING:  # `shim start`/`delete` parse the configuration: keep their imports small
    from hypervisors.base import Hypervisor, HypervisorConfig, HypervisorDriver, VmSpec

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _packages() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(hypervisors.__path__) if m.ispkg)


def known_drivers() -> list[str]:
    """Names of the hypervisor packages that export a ``DRIVER`` (a helper package, such as
    ``vsock``, does not)."""
    return [name for name in _packages()
            if getattr(importlib.import_module(f"hypervisors.{name}"), "DRIVER", None)]


def driver(name: str, source: str = "<config>") -> HypervisorDriver:
    """The driver of ``[hypervisor.<name>]``; `ConfigError` if there is none."""
    if _NAME.match(name) and name in _packages():
        module = importlib.import_module(f"hypervisors.{name}")
        found: HypervisorDriver | None = getattr(module, "DRIVER", None)
        if found is not None:
            return found
    known = ", ".join(f"[hypervisor.{n}]" for n in known_drivers())
    raise ConfigError("hypervisor", name, name, "is not a hypervisor this runtime knows",
                      f"use one of {known}", source)


def parse_hypervisor(tables: Mapping[str, Any], source: str) -> HypervisorConfig:
    """The one ``[hypervisor.<name>]`` table of a configuration, parsed by its driver."""
    names = sorted(tables)
    if len(names) != 1:
        known = ", ".join(f"[hypervisor.{n}]" for n in known_drivers())
        found = ", ".join(f"[hypervisor.{n}]" for n in names) or "none"
        raise ConfigError("hypervisor", "<name>", found, "is not exactly one section",
                          f"keep one of {known}", source)
    name = names[0]
    table = tables[name]
    if not isinstance(table, Mapping):
        raise ConfigError("hypervisor", name, table, "is not a table",
                          f"write [hypervisor.{name}] with its keys", source)
    return driver(name, source).parse_config(table, source)


def create_hypervisor(config: HypervisorConfig, vm: VmSpec) -> Hypervisor:
    """A VM of the configured hypervisor (nothing runs until it is started)."""
    return driver(config.name).create(config, vm)
