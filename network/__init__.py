"""network: the pod's network namespace as the VM will see it (interfaces today).

* `types`: what a pod network is (`Interface`, `IpAddress`, `Route`, `Neighbour`,
  `NetworkDescription`) and what wiring one interface into a VM yields (`Endpoint`): frozen
  dataclasses that validate themselves, so nothing malformed reaches a netlink call or the
  agent;
* `model`: the `NetworkModel` seam (scan a netns, attach an interface to a tap, detach),
  implemented for ``tcfilter`` and ``macvtap`` when pod networking lands.

It imports nothing of the project but `common`; the sandbox layer turns an `Endpoint` into
a hypervisor's network device and the description into agent calls.
"""
