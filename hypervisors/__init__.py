"""hypervisors: QEMU VMs for sandboxes (below sandbox/, above nothing but the OS).

Modules, one job each:

* `config`: ``[hypervisor.qemu]`` -> frozen `QemuConfig` (+ `ConfigError`).
* `accel`: KVM-or-TCG decision with a reason (pure `decide` + cached host probe).
* `qemu_args`: pure argv builder, one small class per option group; `StatePaths`.
* `qmp_core`: sans-IO QMP state machine; `qmp`: thin asyncio client over it.
* `virtiofsd`: the shared-directory daemon.
* `procs`: spawning with PDEATHSIG, (pid, start time) records, `kill_recorded`.
* `qemu`: the `Qemu` facade the sandbox layer uses.
* `timeouts`: the one table of deadlines.

This package knows nothing of the agent protocol; it only reports where the agent channel
is (`Qemu.agent_address`).
"""

from hypervisors.accel import AccelChoice, choose_accelerator
from hypervisors.config import ConfigError, QemuConfig, load_qemu_config
from hypervisors.errors import HypervisorError, HypervisorTimeout, QmpCommandError, QmpError
from hypervisors.procs import ProcessRecord, kill_recorded
from hypervisors.qemu import Qemu
from hypervisors.qemu_args import AgentChannel

__all__ = [
    "AccelChoice",
    "AgentChannel",
    "ConfigError",
    "HypervisorError",
    "HypervisorTimeout",
    "ProcessRecord",
    "Qemu",
    "QemuConfig",
    "QmpCommandError",
    "QmpError",
    "choose_accelerator",
    "kill_recorded",
    "load_qemu_config",
]
