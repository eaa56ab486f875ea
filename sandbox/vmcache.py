"""The VM cache of ``[factory] vm_cache_number``: ``kata-runtime factory init|status|destroy``.

`serve` runs the cache (the hypervisor driver's, `hypervisors.qemu.vmcache`) in the
foreground: it keeps ``vm_cache_number`` VMs booted, each shaped as a pod's VM at the
smallest size a pod may get (as a template is, `sandbox.template.template_size`), and hands
them to pods' shims, which plug the pod's share and NICs, grow it, and hand the guest over
as after a template restore (`Sandbox._hand_over`). It stops on SIGTERM, SIGINT or
`stop` (``factory destroy``): the VMs nobody took are stopped; those it handed out are
their pods' (each under a holder the pod's shim owns: `kata-vm-holder`, hostos/holder.c)
and run on, also when the daemon is killed.

Unlike templates' clones, cached VMs share nothing: each booted on its own, with its own
kernel layout and RNG state.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from common.constants import AGENT_SERVING_MARK
from hostos.holder import HolderMissing, holder_path
from hypervisors import vmcache_control
from hypervisors.errors import HypervisorError
from hypervisors.factory import driver
from hypervisors.vmcache_wire import WireError, reply_error
from sandbox.config import RuntimeConfig
from sandbox.errors import FailedPreconditionError, UnavailableError
from sandbox.sandbox import vm_spec
from sandbox.template import template_size

CACHE_ID = "vm-cache"


async def serve(config: RuntimeConfig) -> None:
    """Run the cache until SIGTERM or SIGINT (or ``factory destroy``)."""
    endpoint = config.factory.cache_endpoint(config.state_dir)
    spec = vm_spec(config, CACHE_ID, config.state_dir, None, template_size(config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await driver(config.hypervisor.name).serve_vm_cache(
            config.hypervisor, spec, config.factory.vm_cache_number, endpoint,
            AGENT_SERVING_MARK, stop)
    except HypervisorError as e:
        raise UnavailableError(f"failed to run the VM cache at {endpoint}: {e}") from e


def status(config: RuntimeConfig) -> dict[str, Any]:
    """Whether a cache serves the endpoint, and how many VMs it has ready."""
    endpoint = config.factory.cache_endpoint(config.state_dir)
    doc: dict[str, Any] = {"vm_cache_number": config.factory.vm_cache_number,
                           "endpoint": str(endpoint), "serving": False, "ready": 0,
                           "claimed": 0, "reason": ""}
    try:
        reply = vmcache_control.ask(endpoint, "describe")
    except (OSError, WireError) as e:
        doc["reason"] = f"no VM cache answers: {getattr(e, 'strerror', None) or e}"
        try:
            holder_path()
        except HolderMissing as missing:  # and none could start here
            doc["reason"] += f"; {missing}"
        return doc
    doc.update(serving=True, ready=int(reply.get("ready", 0)),
               claimed=int(reply.get("claimed", 0)), reason=reply_error(reply) or "")
    return doc


def stop(config: RuntimeConfig) -> bool:
    """Ask the cache to stop; False if none was serving."""
    endpoint = config.factory.cache_endpoint(config.state_dir)
    try:
        reply = vmcache_control.ask(endpoint, "stop")
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except (OSError, WireError) as e:
        raise FailedPreconditionError(f"failed to stop the VM cache at {endpoint}: {e}") from e
    error = reply_error(reply)
    if error:
        raise FailedPreconditionError(f"the VM cache at {endpoint} did not stop: {error}")
    return True


def remove_leftovers(config: RuntimeConfig) -> bool:
    """Remove what a VM cache killed with -9 left at the configured endpoint (its socket,
    its VMs' directories), unless one serves there; False if nothing was left."""
    endpoint = config.factory.cache_endpoint(config.state_dir)
    return driver(config.hypervisor.name).remove_vm_cache_leftovers(endpoint)
