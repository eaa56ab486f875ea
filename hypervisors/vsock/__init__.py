"""vsock: our vhost-user-vsock back-end (issue 12, docs/vsock.md).

The pure (sans-IO) cores, one job each; none of them touches a socket, an mmap or a clock
(`device` only closes the fds it is handed):

* `vhost_user`: the vhost-user message layer (QEMU docs/interop/vhost-user.rst): a bounded
  `Parser` from bytes + fds to typed messages, and the reply/message builders;
* `virtqueue`: a split virtqueue over caller-supplied guest memory (`GuestMemory`), with
  every descriptor chain validated and every buffer bounds-checked;
* `packets`: the 44-byte virtio-vsock packet header (virtio 1.2, Socket Device);
* `connections`: one stream's state machine with credit-based flow control;
* `hybrid`: the host-side ``CONNECT <port>\\n`` / ``OK <port>\\n`` handshake (Firecracker);
* `streams`: the device's streams: routing guest packets, host ports, bounds, rx order;
* `device`: the vhost-user-vsock device (control path and data path) over the above;
* `errors`: the error types; everything raised on bad input is a `VsockError`.

And the I/O around them: `backend` (the per-VM process and its event loop), `clients` (its
hybrid unix clients) and `process` (the shim's handle on the process).
"""
