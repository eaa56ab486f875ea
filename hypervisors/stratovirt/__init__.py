"""StratoVirt (openEuler's Rust VMM) behind the hypervisor interface: ``[hypervisor.stratovirt]``.

* `config`: the section -> `StratovirtConfig`;
* `args`: the pure command-line builder for StratoVirt's microvm machine;
* `vm`: `Stratovirt`, one VM (a `hypervisors.base.Hypervisor` on the shared lifecycle of
  `hypervisors.vmm`);
* `checks`: what ``kata-runtime check`` asks of this host for StratoVirt.

Everything StratoVirt-specific here was checked against StratoVirt's documentation and a
scripted stand-in (tests/harness/stratovirt_peer.py), not a real StratoVirt: see
docs/stratovirt.md. ``DRIVER`` is what `hypervisors.factory` loads. Importing this package
loads only the configuration code; the VM code is imported when a VM is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisors.stratovirt.config import NAME, StratovirtConfig

if TYPE_CHECKING:  # loaded by every `shim start`/`delete`: types only
    import asyncio

    from hypervisors.base import HostCheck, Hypervisor, HypervisorConfig, TemplateInfo, VmSpec


NO_TEMPLATES = "StratoVirt VMs are not made from templates by this version (use QEMU)"


class _StratovirtDriver:
    name = NAME

    def parse_config(self, table: Mapping[str, Any], source: str) -> StratovirtConfig:
        return StratovirtConfig.from_table(table, source)

    def create(self, config: HypervisorConfig, vm: VmSpec) -> Hypervisor:
        from hypervisors.stratovirt.vm import Stratovirt

        assert isinstance(config, StratovirtConfig), type(config)
        return Stratovirt(config, vm)

    def host_checks(self, config: HypervisorConfig, source: str) -> list[HostCheck]:
        from hypervisors.stratovirt.checks import host_checks

        assert isinstance(config, StratovirtConfig), type(config)
        return host_checks(config, source)

    async def make_template(self, config: HypervisorConfig, vm: VmSpec, template_dir: Path,
                            ready_mark: str) -> TemplateInfo:
        from hypervisors.errors import HypervisorUnsupported

        raise HypervisorUnsupported(f"failed to make a VM template: {NO_TEMPLATES}")

    def template_mismatch(self, config: HypervisorConfig, vm: VmSpec,
                          template_dir: Path) -> str | None:
        return NO_TEMPLATES

    async def serve_vm_cache(self, config: HypervisorConfig, vm: VmSpec, count: int,
                             endpoint: Path, ready_mark: str, stop: asyncio.Event) -> None:
        from hypervisors.errors import HypervisorUnsupported

        raise HypervisorUnsupported(f"failed to start a VM cache: {NO_TEMPLATES}")

    def remove_vm_cache_leftovers(self, endpoint: Path) -> bool:
        # A cache is QEMU's, but one left from a former configuration can go.
        from hypervisors.qemu.vmcache import remove_leftovers

        return remove_leftovers(endpoint)

    def remove_template(self, template_dir: Path) -> bool:
        # A template is QEMU's, but one left from a former configuration can go.
        from hypervisors.qemu.template import remove_files

        return remove_files(template_dir)


DRIVER = _StratovirtDriver()
