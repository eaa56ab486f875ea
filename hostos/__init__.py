"""hostos: the host operating system as the runtime uses it, in one place.

* `syscalls`: the libc calls the standard library lacks (mount, umount2), through cffi's
  out-of-line ABI mode (`ffi_build` writes `_libc_cffi`; importing it parses no C, ~3 ms);
* `procs`: host processes: identity by (pid, start time), killing what a crashed shim
  left, and spawning helpers through an exec wrapper that sets the parent-death signal.

It is the bottom layer of the host side: it imports only `common` and the standard library.
"""
