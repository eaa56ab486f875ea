"""Test configurations for containerd-shim-kata-v2 (a copy of configuration.toml with
overrides), written to a file that containerd exports to its shims as KATA_CONF_FILE.

The base is the shipped configuration.toml unless ``KATA_TEST_CONFIG`` names another
shipped file (``make test-microvm``: configuration-qemu-microvm.toml; ``make
test-stratovirt``: configuration-stratovirt.toml), and ``KATA_TEST_VMM`` may replace its
hypervisor binary (``path``). Tests write their overrides to `HYPERVISOR`, the base's one
``[hypervisor.<name>]`` section, so the same suite runs on every hypervisor."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = Path(os.environ.get("KATA_TEST_CONFIG") or REPO / "configuration.toml")
GUEST_DIR = REPO / "build" / "out"
Overrides = Mapping[str, Mapping[str, Any]]  # {"hypervisor.qemu": {"kernel": "/x"}}


def _hypervisor_table(base: Path = DEFAULT_CONFIG) -> tuple[str, dict[str, Any]]:
    tables = tomllib.loads(base.read_text()).get("hypervisor", {})
    if len(tables) != 1:
        raise ValueError(f"{base}: expected one [hypervisor.<name>] section, got {list(tables)}")
    name, table = next(iter(tables.items()))
    return f"hypervisor.{name}", table


#: The base configuration's hypervisor section, e.g. "hypervisor.qemu".
HYPERVISOR, _BASE_TABLE = _hypervisor_table()
#: The section's settings as shipped ("machine_type", "path", ...).
BASE_HYPERVISOR: Mapping[str, Any] = _BASE_TABLE


def is_qemu() -> bool:
    return HYPERVISOR == "hypervisor.qemu"


def uses_root_image(base: Path = DEFAULT_CONFIG) -> bool:
    """Whether ``base``'s guests mount the shared read-only root image (``image``)."""
    return bool(_hypervisor_table(base)[1].get("image"))


def can_hotplug() -> bool:
    """Whether the base's VMs can grow (QEMU on a PC machine: q35; not microvm)."""
    return is_qemu() and BASE_HYPERVISOR.get("machine_type", "q35") != "microvm"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Write `{"a.b": {"key": value}}` as TOML tables (scalars and lists only)."""
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """{"hypervisor": {"qemu": {...}}} -> {"hypervisor.qemu": {...}}."""
    tables: dict[str, dict[str, Any]] = {}
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    if scalars and prefix:
        tables[prefix] = scalars
    for k, v in doc.items():
        if isinstance(v, dict):
            tables.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return tables


#: The agent channel a run of the suite uses: "serial", "vhost-user" (vsock through our
#: back-end), or unset: the base configuration's choice.
AGENT_CHANNEL_ENV = "KATA_TEST_AGENT_CHANNEL"
AGENT_CHANNELS: dict[str, dict[str, Any]] = {
    "": {}, "serial": {"use_vsock": False}, "vhost-user": {"vsock_backend": "vhost-user"}}


def agent_channel_keys(channel: str) -> dict[str, Any]:
    """The hypervisor keys that select ``channel`` (QEMU only has the choice)."""
    if channel not in AGENT_CHANNELS:
        raise ValueError(f"{AGENT_CHANNEL_ENV}={channel!r}: want one of serial, vhost-user")
    return AGENT_CHANNELS[channel] if is_qemu() else {}


def kernel_file(base: Path) -> str:
    """The file of `make guest`'s that `base`'s kernel key names: the ELF vmlinux
    (``vmlinux.container``) or the bzImage (``vmlinuz.container``, StratoVirt's)."""
    kernel = str(_hypervisor_table(base)[1].get("kernel", ""))
    return "vmlinux" if os.path.basename(kernel).startswith("vmlinux") else "vmlinuz"


def guest_kernel(base: Path = DEFAULT_CONFIG) -> Path:
    """The kernel of `make guest`'s that the tests' configuration over `base` boots."""
    return GUEST_DIR / kernel_file(base)


def overrides_for_tests(state_dir: Path, guest_dir: Path = GUEST_DIR,
                        memory_mib: int = 512,
                        base: Path = DEFAULT_CONFIG) -> dict[str, dict[str, Any]]:
    """The test settings over ``base``: the guest of ``guest_dir`` (the shared root image
    and its loader where ``base`` boots one, else the whole initrd), a small VM, TCG
    allowed, debug logs, a private state dir."""
    hypervisor: dict[str, Any] = {"kernel": str(guest_dir / kernel_file(base)),
                                  "initrd": str(guest_dir / "initrd.img"),
                                  "default_memory": memory_mib}
    if uses_root_image(base):
        hypervisor.update(image=str(guest_dir / "rootfs.img"),
                          initrd=str(guest_dir / "rootfs-loader.img"))
    if is_qemu():
        hypervisor["allow_tcg"] = True  # these machines have no usable KVM (environment.md)
    if os.environ.get("KATA_TEST_VMM"):
        hypervisor["path"] = os.environ["KATA_TEST_VMM"]
    hypervisor.update(agent_channel_keys(os.environ.get(AGENT_CHANNEL_ENV, "")))
    return {HYPERVISOR: hypervisor,
            "runtime": {"state_dir": str(state_dir), "enable_debug": True}}


def write(path: Path, *overrides: Overrides, base: Path = DEFAULT_CONFIG) -> Path:
    """Copy `base` with `overrides` applied (later ones win) to `path`; checks it parses."""
    tables = flatten(tomllib.loads(base.read_text()))
    for ov in overrides:
        for name, values in ov.items():
            tables.setdefault(name, {}).update(values)
    text = dumps(tables)
    tomllib.loads(text)
    path.write_text(text)
    return path
