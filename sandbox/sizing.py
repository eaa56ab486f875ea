"""How big a pod's VM is: static sizing from the pod's limits.

With ``static_sandbox_resource_mgmt`` (Kata's key, in ``[runtime]``) the VM is sized once,
at start, from the limits the kubelet sums up for the pod (CRI passes them on the sandbox
container as ``io.kubernetes.cri.sandbox-*`` annotations):

* vCPUs = the CPU limit rounded up (``ceil(quota / period)``), so ``nproc`` in a container
  limited to 1 CPU says 1, not the host's count; capped at ``default_maxvcpus`` or else
  the host's CPUs;
* memory = ``static_sandbox_base_memory`` (the guest kernel and agent) + the memory limit,
  so ``free`` shows about the limit, not the host's RAM. More than ``default_maxmemory``
  (or else the host's RAM) is refused with an error naming both.

A pod without a limit gets the configured ``default_vcpus``/``default_memory``. Kata adds
the limits to the defaults instead; we size from the limits so that what the workload sees
is what it was given. Pure: the host figures come in as arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sandbox.errors import InvalidArgumentError
from sandbox.types import PodResources

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What the configuration and the host allow."""

    static: bool  # static_sandbox_resource_mgmt
    base_memory_mib: int  # static_sandbox_base_memory
    max_vcpus: int  # default_maxvcpus, 0 = the host's CPUs
    max_memory_mib: int  # default_maxmemory, 0 = the host's RAM
    host_cpus: int
    host_memory_mib: int


@dataclass(frozen=True)
class VmSize:
    """None: the configuration's default."""

    vcpus: int | None = None
    memory_mib: int | None = None


def vm_size(resources: PodResources, limits: Limits) -> VmSize:
    """The VM's size for a pod (see the module docstring)."""
    if not limits.static:
        return VmSize()
    vcpus = None
    if resources.cpu_quota and resources.cpu_period:
        ceiling = limits.max_vcpus or limits.host_cpus
        vcpus = max(1, min(math.ceil(resources.cpu_quota / resources.cpu_period), ceiling))
    memory = None
    if resources.memory_limit_bytes:
        memory = limits.base_memory_mib + math.ceil(resources.memory_limit_bytes / MIB)
        most = limits.max_memory_mib or limits.host_memory_mib
        if memory > most:
            key = "default_maxmemory" if limits.max_memory_mib else "the host's memory"
            raise InvalidArgumentError(
                f"failed to size the pod's VM: it needs {memory} MiB (a memory limit of "
                f"{math.ceil(resources.memory_limit_bytes / MIB)} MiB plus "
                f"static_sandbox_base_memory = {limits.base_memory_mib}), more than the "
                f"{most} MiB allowed ({key}); lower the pod's limits or raise "
                "default_maxmemory in the configuration")
    return VmSize(vcpus, memory)
