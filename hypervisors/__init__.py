"""hypervisors: VMs for sandboxes behind one interface (below sandbox/, above hostos/).

Shared modules, one job each:

* `base`: the interface the sandbox layer sees (`Hypervisor`, `HypervisorConfig`,
  `HypervisorDriver`, devices, `VmSpec`);
* `factory`: ``[hypervisor.<name>]`` -> the package ``hypervisors.<name>`` and its driver;
* `config`: typed parsing of a section (+ `ConfigError`);
* `accel`: KVM-or-TCG decision with a reason (pure `decide` + cached host probe);
* `statepaths`: the files a VM keeps in its state directory;
* `qmp_core`: sans-IO QMP state machine; `qmp`: asyncio client over it (fd passing,
  bounded event log);
* `virtiofsd`: the shared-directory daemon; `console`: the size-capped guest console;
* `timeouts`: the one table of deadlines; `errors`: the error types;
* `vmm`: the VM lifecycle the drivers share (virtiofsd, console, spawn, QMP, quit/kill);
* `hostchecks`: the `kata-runtime check` lines every driver has (files, version).

One package per hypervisor: `qemu`, and `stratovirt` (checked against StratoVirt's
documentation and a scripted stand-in only, see docs/stratovirt.md). This package knows
nothing of the agent protocol; a VM only reports where the agent channel is
(``agent_address``). Import the submodules themselves: this file loads nothing, so that
``shim delete`` starts fast.
"""
