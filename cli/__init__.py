"""kata-runtime: the operator CLI (check, list, env), on top of the sandbox layer.

It reaches the runtime only through `sandbox.config` and `sandbox.inspect` (never a
hypervisor package) and decides on errors by their type.
"""
