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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisors.qemu.config import NAME, QemuConfig

if TYPE_CHECKING:  # loaded by every `shim start`/`delete`: types only
    import asyncio

    from hypervisors.base import HostCheck, Hypervisor, HypervisorConfig, TemplateInfo, VmSpec


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

    async def make_template(self, config: HypervisorConfig, vm: VmSpec, template_dir: Path,
                            ready_mark: str) -> TemplateInfo:
        from hypervisors.qemu.vm import make_template

        assert isinstance(config, QemuConfig), type(config)
        return await make_template(config, vm, template_dir, ready_mark)

    def template_mismatch(self, config: HypervisorConfig, vm: VmSpec,
                          template_dir: Path) -> str | None:
        from hypervisors.qemu.vm import template_mismatch

        assert isinstance(config, QemuConfig), type(config)
        return template_mismatch(config, vm, template_dir)

    def remove_template(self, template_dir: Path) -> bool:
        from hypervisors.qemu.template import remove_files

        return remove_files(template_dir)

    async def serve_vm_cache(self, config: HypervisorConfig, vm: VmSpec, count: int,
                             endpoint: Path, ready_mark: str, stop: asyncio.Event) -> None:
        from hypervisors.qemu.vm import serve_vm_cache

        assert isinstance(config, QemuConfig), type(config)
        await serve_vm_cache(config, vm, count, endpoint, ready_mark, stop)

    def remove_vm_cache_leftovers(self, endpoint: Path) -> bool:
        from hypervisors.qemu.vmcache import remove_leftovers

        return remove_leftovers(endpoint)


DRIVER = _QemuDriver()
