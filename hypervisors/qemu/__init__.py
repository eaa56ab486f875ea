"""QEMU behind the hypervisor interface: ``[hypervisor.qemu]``.

* `config`: the section -> `QemuConfig`;
* `args`: the pure command-line builder (also used by build/bootguest.py);
* `vm`: `Qemu`, one VM (a `hypervisors.base.Hypervisor`);
* `checks`: what ``kata-runtime check`` asks of this host for QEMU.

``DRIVER`` is what `hypervisors.factory` loads. Importing this package loads only the
configuration code; the VM code is imported when a VM is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hypervisors.qemu.config import NAME, QemuConfig

if TYPE_CHECKING:  # loaded by every `shim start`/`delete`: types only
    from hypervisors.base import HostCheck, Hypervisor, HypervisorConfig, VmSpec


class _QemuDriver:
    name = NAME

    def parse_config(self, table: Mapping[str, Any], source: str) -> QemuConfig:
        return QemuConfig.from_table(table, source)

    def create(self, config: HypervisorConfig, vm: VmSpec) -> Hypervisor:
        from hypervisors.qemu.vm import Qemu

        assert isinstance(config, QemuConfig), type(config)
        return Qemu(config, vm)

    def host_checks(self, config: HypervisorConfig, source: str) -> list[HostCheck]:
        from hypervisors.qemu.checks import host_checks

        assert isinstance(config, QemuConfig), type(config)
        return host_checks(config, source)


DRIVER = _QemuDriver()
