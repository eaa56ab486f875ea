"""The VM template of ``[factory] enable_template``: ``kata-runtime factory init|status|destroy``.

Theory of operation
-------------------
`make` boots one VM as a pod's would be (`sandbox.sandbox.vm_spec`) at the smallest size a
pod can have (`template_size`), waits until its agent serves, and saves it in
``template_path``; from then on a pod whose VM fits restores it instead of booting
(`hypervisors.base.VmSpec.template_dir`; the driver hot-plugs the pod's share, NICs, and
the vCPUs and memory its size adds), and the sandbox hands the restored guest over
(`Sandbox._hand_over`: its clock set, its RNG reseeded, the added vCPUs and memory online).

What clones of one template share, and what that means for isolation (security.md): the
guest kernel's address layout (KASLR), the agent's memory layout and Python hash seed, and
the kernel's boot id. The RNG state is shared too until the hand-over reseeds it, before any
container runs. Each container's processes are new and laid out from the reseeded RNG.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from common.constants import AGENT_SERVING_MARK
from hypervisors.errors import HypervisorError
from hypervisors.factory import driver
from sandbox.config import RuntimeConfig
from sandbox.errors import FailedPreconditionError, UnavailableError
from sandbox.sandbox import vm_spec
from sandbox.sizing import VmSize

TEMPLATE_ID = "template"


async def make(config: RuntimeConfig) -> dict[str, Any]:
    """Boot and save the template (replacing any); what was made, as JSON values."""
    path = config.factory.template_path
    spec = vm_spec(config, TEMPLATE_ID, path, path, template_size(config))
    started = time.monotonic()
    try:
        info = await driver(config.hypervisor.name).make_template(
            config.hypervisor, spec, path, AGENT_SERVING_MARK)
    except HypervisorError as e:
        raise UnavailableError(f"failed to make the VM template in {path}: {e}") from e
    return {"path": str(info.path), "created": _utc(info.created),
            "boot_seconds": round(info.boot_seconds, 2),
            "save_seconds": round(info.save_seconds, 2),
            "state_mib": round(info.state_bytes / 2**20, 1),
            "total_seconds": round(time.monotonic() - started, 2),
            "enabled": config.factory.enable_template}


def status(config: RuntimeConfig) -> dict[str, Any]:
    """Whether templates are on, and whether a pod's VM would be restored from this one."""
    path = config.factory.template_path
    spec = vm_spec(config, "status", path, path, VmSize())
    why = driver(config.hypervisor.name).template_mismatch(config.hypervisor, spec, path)
    return {"enabled": config.factory.enable_template, "path": str(path),
            "usable": why is None, "reason": why or ""}


def destroy(config: RuntimeConfig) -> bool:
    """Remove the template; False if there was none."""
    path = config.factory.template_path
    try:
        return driver(config.hypervisor.name).remove_template(path)
    except HypervisorError as e:
        raise FailedPreconditionError(str(e)) from e


def template_size(config: RuntimeConfig) -> VmSize:
    """The smallest VM a pod may get, so that every pod's VM grows from it by hot-plug:
    with ``static_sandbox_resource_mgmt`` one vCPU and the base memory (a pod with limits
    has more), else the defaults every pod has."""
    if not config.static_sandbox_resource_mgmt:
        return VmSize()
    return VmSize(vcpus=1, memory_mib=config.static_sandbox_base_memory)


def _utc(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
