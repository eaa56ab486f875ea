"""Names and numbers the host runtime and the guest agent must agree on."""

from __future__ import annotations

#: virtio-fs / 9p tag of the sandbox's shared directory.
SHARED_FS_TAG = "kataShared"
#: Where the guest mounts that share.
GUEST_SHARED_DIR = "/run/kata-containers/shared"
#: Name of the virtio-serial port that carries the agent channel.
AGENT_PORT_NAME = "agent.channel.0"
#: Name of the virtio-serial port of the guest's debug console (``kata-runtime exec``);
#: the VM has it only when ``[agent.kata] debug_console_enabled = true``.
DEBUG_CONSOLE_PORT_NAME = "agent.debug_console.0"
#: Kernel parameter (Kata's name) that tells the agent to serve the debug console.
DEBUG_CONSOLE_KERNEL_PARAM = "agent.debug_console"
#: Kernel parameter (ours) the host sets under TCG: the agent starts crun without
#: address-space randomisation, so QEMU reuses crun's translated code from call to call.
CRUN_NO_ASLR_KERNEL_PARAM = "agent.crun_no_aslr"
#: Kernel parameter (ours) the host sets under TCG: the agent answers a process's output in
#: full flow in larger pieces, each answer being dear there (agent/streams.py).
GATHER_OUTPUT_KERNEL_PARAM = "agent.gather_output"
#: Kernel parameter (ours) the host sets under TCG: the agent makes the guest's scheduler
#: let a woken task preempt the running one less eagerly (agent/init.py `tune_wakeups`).
SCHED_THROUGHPUT_KERNEL_PARAM = "agent.sched_throughput"
#: What the agent writes on the debug console port when the shell has exited: virtio-serial
#: cannot close the host's end, so the end of a session is said in-band. An OSC sequence,
#: which a terminal shown it by mistake ignores.
DEBUG_CONSOLE_EXIT = b"\x1b]6573;kata-debug-console-exit\x07"
#: AF_VSOCK port the agent listens on.
AGENT_VSOCK_PORT = 1024
#: The guest's debug console when the agent is on vsock (Kata's port for it).
DEBUG_CONSOLE_VSOCK_PORT = 1026
#: 128 + SIGKILL: the status of a process killed, or deleted before it ever ran.
EXIT_STATUS_KILLED = 137
#: Where per-sandbox host state lives unless ``[runtime] state_dir`` says otherwise.
DEFAULT_STATE_DIR = "/run/kata-py"
#: ``[factory] template_path``'s default: beside the state dir, not in it (that holds sandboxes).
DEFAULT_TEMPLATE_DIR = "/run/kata-py-template"
#: What the agent prints on the guest console once it serves (a VM template is saved then).
AGENT_SERVING_MARK = "kata-agent: serving on"
#: Version of the host runtime (shim and operator CLI).
RUNTIME_VERSION = "0.1.0"
