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
is (`Qemu.agent_address`). Import the submodules themselves: this file loads nothing, so
that `shim delete` (which needs only `procs`) starts fast.
"""
