"""A scripted stand-in for StratoVirt, for tests on hosts without it (and without KVM).

Two parts, both following StratoVirt's documentation (docs/config_guidebook.md and
docs/qmp.md of openeuler-mirror/stratovirt; the section is named where each rule is):

* `QmpPeer`: StratoVirt's QMP server on a unix socket. It greets with either documented
  greeting, answers ``qmp_capabilities`` *without* an id (as StratoVirt's QMP code does),
  parses each read as one message (two commands in one read are a parse error, answered
  without an id), refuses unknown fields (its schema denies them) and answers the micro VM's
  hot-plug commands with its error texts; ``errors`` scripts more failures.
* `fake_main`: a fake ``stratovirt`` executable (`write_fake_stratovirt` makes one): it
  validates its argv against the documented grammar (exit 1 with the problem on stderr, as
  StratoVirt refuses a bad command line), checks inherited tap fds, connects to virtiofsd,
  writes its pid file, listens on its chardev sockets and serves `QmpPeer` on ``-qmp``.
  ``-daemonize`` is refused: the shim must keep the VMM as its child.

Nothing here is StratoVirt's code; where its source differs from its documentation the
peer follows the documentation and docs/stratovirt.md says so.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VERSION = "StratoVirt 2.4.0"
#: qmp.md "QMP Connection".
GREETING_QMP_MD = {"QMP": {"version": {"StratoVirt": {"micro": 1, "minor": 0, "major": 0},
                                       "package": ""}, "capabilities": []}}
#: docs/cpu_hotplug.md "Hotplug CPU" (what StratoVirt 2.x sends: a QEMU-like version).
GREETING_CPU_HOTPLUG_MD = {"QMP": {"version": {"qemu": {"micro": 1, "minor": 0, "major": 5},
                                               "package": "StratoVirt-2.4.0"},
                                   "capabilities": []}}
#: Micro VM replaceable slots (StratoVirt's micro VM: 4 disks, 2 NICs).
SLOTS = {"blk": 4, "net": 2}
#: Fields StratoVirt's QMP schema accepts per command (it denies any other).
FIELDS: dict[str, set[str]] = {
    "qmp_capabilities": set(), "quit": set(), "stop": set(), "cont": set(),
    "query-status": set(), "getfd": {"fdname"}, "device_del": {"id"},
    "blockdev-add": {"node-name", "file", "media", "cache", "read-only", "detect-zeroes",
                     "driver", "backing", "discard", "id", "options", "throttling.iops-total",
                     "l2-cache-size", "refcount-cache-size"},
    "netdev_add": {"id", "ifname", "fd", "fds", "dnssearch", "type", "vhost", "vhostfd",
                   "vhostfds", "downscript", "script", "queues", "chardev", "macnat"},
    "device_add": {"id", "driver", "addr", "lun", "drive", "romfile", "share-rw", "bus", "mac",
                   "netdev", "chardev", "disable-modern", "mq", "vectors", "serial",
                   "iothread", "multifunction", "host", "num-queues", "boot_index",
                   "sysfsdev", "queue-size", "port", "backend", "path"},
}


class PeerError(Exception):
    """A command StratoVirt would answer with a GenericError."""


@dataclass
class Behaviour:
    """How the peer (and the fake) behaves; plain values so the fake's script can embed it."""

    greeting: str = "qmp.md"  # or "cpu_hotplug.md"
    #: command -> error description (a GenericError reply with the command's id).
    errors: dict[str, str] = field(default_factory=dict)
    #: "exit" (reply, SHUTDOWN, exit), "ignore" (reply, keep running), "hang" (no reply).
    quit: str = "exit"
    #: The fake exits with status 1 and this on stderr before listening on anything.
    fail_at_start: str = ""
    #: Where the fake writes its argv (JSON) and the QMP commands it got (one per line).
    record_dir: str = ""
    #: Seconds to wait before each read: a slow reader sees commands sent together.
    read_delay: float = 0.0

    def to_json(self) -> str:
        """For embedding in the fake's script."""
        return json.dumps(self.__dict__)


@dataclass
class QmpPeer:
    """StratoVirt's QMP side of one VM (see the module docstring)."""

    behaviour: Behaviour = field(default_factory=Behaviour)
    on_quit: Callable[[], None] = lambda: None
    status: str = "running"
    fds: dict[str, int] = field(default_factory=dict)
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: Every command received, and every read that was not exactly one message.
    commands: list[dict[str, Any]] = field(default_factory=list)
    bad_reads: list[bytes] = field(default_factory=list)

    # -- serving -----------------------------------------------------------------------

    def serve(self, listener: socket.socket, stop: threading.Event) -> None:
        """Accept connections one at a time until ``stop`` is set (or quit exits)."""
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                if self.converse(conn) == "quit":
                    return

    def converse(self, conn: socket.socket) -> str:
        """One client: greeting, then one message per read (qmp.md; StratoVirt's reader)."""
        conn.settimeout(None)
        greeting = (GREETING_QMP_MD if self.behaviour.greeting == "qmp.md"
                    else GREETING_CPU_HOTPLUG_MD)  # fmt: skip
        send(conn, greeting)
        while True:
            time.sleep(self.behaviour.read_delay)
            try:
                data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 8))
            except OSError:
                return "closed"
            if not data:
                return "closed"
            fds = received_fds(ancdata)
            if self.handle(conn, data, fds) == "quit":
                return "quit"

    def handle(self, conn: socket.socket, data: bytes, fds: list[int]) -> str:
        """Answer one read; "quit" when the VMM should exit."""
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
                raise ValueError("not a QMP command")
        except ValueError as e:  # serde_json refuses trailing data: two messages in a read
            self.bad_reads.append(data)
            send(conn, {"error": {"class": "GenericError", "desc": f"{e}"}})
            return ""
        self.commands.append(msg)
        command, cmd_id, args = msg["execute"], msg.get("id"), msg.get("arguments", {})
        unknown = set(args) - FIELDS.get(command, set())
        if command not in FIELDS or unknown:
            # A command the schema cannot decode is answered without an id.
            what = (f"unknown field `{sorted(unknown)[0]}`" if unknown
                    else f"unknown variant `{command}`")
            send(conn, {"error": {"class": "GenericError", "desc": what}})
            return ""
        if command == "quit":
            return self._quit(conn, cmd_id)
        try:
            if command in self.behaviour.errors:
                raise PeerError(self.behaviour.errors[command])
            value, events = self.run(command, args, fds)
        except PeerError as e:
            reply = {"error": {"class": "GenericError", "desc": str(e)}, "id": cmd_id}
            send(conn, reply if command != "qmp_capabilities" else {"error": reply["error"]})
            return ""
        for event in events:  # qmp.md stop/cont/device_del: the event comes first
            send(conn, event)
        reply = {"return": value}
        if command != "qmp_capabilities":  # StratoVirt's QMP leaves its id out
            reply["id"] = cmd_id
        send(conn, reply)
        return ""

    def _quit(self, conn: socket.socket, cmd_id: Any) -> str:
        """qmp.md quit: the reply, then SHUTDOWN (reason host-qmp-quit), then exit."""
        if self.behaviour.quit == "hang":
            return ""
        send(conn, {"return": {}, "id": cmd_id})
        if self.behaviour.quit == "ignore":
            return ""
        send(conn, event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
        self.on_quit()
        return "quit"

    # -- commands ----------------------------------------------------------------------

    def run(self, command: str, args: Mapping[str, Any],
            fds: list[int]) -> tuple[Any, list[dict[str, Any]]]:  # fmt: skip
        """(return value, events before the reply) or `PeerError`."""
        if command == "qmp_capabilities":
            return {}, []
        if command == "query-status":  # qmp.md query-status
            running = self.status == "running"
            return {"running": running, "singlestep": False, "status": self.status}, []
        if command in ("stop", "cont"):  # qmp.md stop / cont
            self.status = "paused" if command == "stop" else "running"
            return {}, [event("STOP" if command == "stop" else "RESUME")]
        if command == "getfd":  # qmp.md getfd: the fd arrives by SCM_RIGHTS
            if not fds:
                raise PeerError("Invalid SCM message")
            self.fds[args["fdname"]] = fds[0]
            return {}, []
        handlers = {"blockdev-add": self.blockdev_add, "netdev_add": self.netdev_add,
                    "device_add": self.device_add, "device_del": self.device_del}
        return handlers[command](args)

    def blockdev_add(self, args: Mapping[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
        """qmp.md blockdev-add; config_guidebook.md 2.2: native aio needs direct on."""
        name, file = args.get("node-name"), args.get("file")
        if not isinstance(name, str) or not isinstance(file, dict):
            raise PeerError("missing field `node-name` or `file`")
        direct = (args.get("cache") or {}).get("direct", True)
        if file.get("aio", "native") == "native" and not direct:
            raise PeerError('Invalid aio: native aio type should be used with "direct" on')
        if not os.path.exists(file.get("filename", "")):
            raise PeerError(f"Failed to open {file.get('filename')}: No such file or directory")
        self._register(name, {"kind": "blk", **args})
        return {}, []

    def netdev_add(self, args: Mapping[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
        """qmp.md netdev_add: ``fds`` names a getfd'd fd (or is a number); no multi-queue."""
        fds = str(args.get("fds", ""))
        name = fds.split(":")[-1]
        if name not in self.fds and not name.isdigit():
            raise PeerError("Add netdev error: failed to convert {} to RawFd.")
        self._register(str(args["id"]), {"kind": "net", **args})
        return {}, []

    def _register(self, ident: str, config: dict[str, Any]) -> None:
        if ident in self.backends:
            raise PeerError(f"Add device config failed: {ident} has been added")
        self.backends[ident] = config

    def device_add(self, args: Mapping[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
        """qmp.md device_add, micro VM: ``id`` names a backend added before; ``addr`` is the
        replaceable slot."""
        ident, driver = str(args["id"]), str(args.get("driver", ""))
        try:
            slot = int(str(args.get("addr", "0")), 0)
        except ValueError:
            raise PeerError(f"Invalid addr for device {ident}") from None
        backend = self.backends.get(ident)
        if backend is None:
            raise PeerError("Failed to find device configuration.")
        kind = "net" if "net" in driver else "blk" if "blk" in driver else ""
        if not kind:
            raise PeerError("Unsupported replaceable device type.")
        if backend["kind"] != kind:
            raise PeerError(f"Device type error: {kind}")
        needs = "drive" if kind == "blk" else "netdev"
        if args.get(needs) != ident:
            raise PeerError(f"No {needs} set")
        if slot >= SLOTS[kind]:
            raise PeerError(f"Number of replaceable {kind} devices is more than {SLOTS[kind]}")
        if any(k == kind and s == slot for k, s in self.devices.values()):
            raise PeerError(f"The slot {slot} is occupied already.")
        self.devices[ident] = (kind, slot)
        return {}, []

    def device_del(self, args: Mapping[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
        """qmp.md device_del: DEVICE_DELETED, then the reply."""
        ident = str(args["id"])
        if self.backends.pop(ident, None) is None:
            raise PeerError(f"Device {ident} not found")
        self.devices.pop(ident, None)
        return {}, [event("DEVICE_DELETED", {"device": ident, "path": ident})]


def send(conn: socket.socket, obj: Mapping[str, Any]) -> None:
    """One message, ``\\r\\n``-terminated as StratoVirt writes it."""
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(obj).encode() + b"\r\n")


def event(name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A QMP event as qmp.md shows them."""
    now = time.time()
    return {"event": name, "data": dict(data or {}),
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """File descriptors carried by SCM_RIGHTS."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds += list(arr)
    return fds


# -- the fake executable ---------------------------------------------------------------------


class ArgvError(ValueError):
    """The command line breaks StratoVirt's documented grammar."""


def options(value: str, first: str = "") -> dict[str, str]:
    """``a=b,c,d=e`` -> dict; a leading bare word is ``first`` (e.g. ``[type=]name``)."""
    out: dict[str, str] = {}
    for i, part in enumerate(value.split(",")):
        key, eq, val = part.partition("=")
        if not eq:
            if i == 0 and first:
                out[first] = key
                continue
            out[key] = ""  # a flag such as server, nowait
        else:
            out[key] = val
    return out


def _allowed(opts: Mapping[str, str], allowed: set[str], what: str) -> None:
    bad = set(opts) - allowed
    if bad:
        raise ArgvError(f"{what}: unknown property {sorted(bad)[0]!r}")


@dataclass
class FakeVm:
    """What the fake's argv asks for, checked option by option (config_guidebook.md)."""

    pairs: list[tuple[str, str]]
    machine: dict[str, str] = field(default_factory=dict)
    chardevs: dict[str, dict[str, str]] = field(default_factory=dict)
    netdevs: dict[str, dict[str, str]] = field(default_factory=dict)
    drives: dict[str, dict[str, str]] = field(default_factory=dict)
    devices: list[dict[str, str]] = field(default_factory=list)
    qmp: str = ""
    pidfile: str = ""
    serial: str = ""
    name: str = ""

    def check(self) -> None:
        """Every option, then what needs the whole line."""
        for flag, value in self.pairs:
            check = getattr(self, "opt_" + flag.lstrip("-").replace("-", "_"), None)
            if check is None:
                raise ArgvError(f"unknown option {flag}")
            check(value)
        seen = {flag for flag, _ in self.pairs}
        for needed in ("-machine", "-kernel", "-qmp"):
            if needed not in seen:
                raise ArgvError(f"{needed} is required here")
        for device in self.devices:
            self.check_device(device)

    def opt_name(self, value: str) -> None:
        self.name = value

    def opt_machine(self, value: str) -> None:
        """1.1: ``-machine [type=]name[,dump-guest-core={on|off}][,mem-share={on|off}]``."""
        opts = options(value, "type")
        _allowed(opts, {"type", "dump-guest-core", "mem-share", "accel", "usb"}, "-machine")
        if opts.get("type") != "microvm":
            raise ArgvError(f"-machine: this fake knows only microvm, not {opts.get('type')}")
        for key in ("dump-guest-core", "mem-share"):
            if opts.get(key, "on") not in ("on", "off"):
                raise ArgvError(f"-machine: {key} must be on or off")
        self.machine = opts

    def opt_smp(self, value: str) -> None:
        """1.2.1: ``-smp [cpus=]n``; 1 to 254."""
        opts = options(value, "cpus")
        _allowed(opts, {"cpus", "maxcpus", "sockets", "dies", "clusters", "cores", "threads"},
                 "-smp")
        if not opts.get("cpus", "").isdigit() or not 1 <= int(opts["cpus"]) <= 254:
            raise ArgvError("-smp: cpus must be 1 to 254")

    def opt_m(self, value: str) -> None:
        """1.3.1: ``-m [size=]<megs>[m|M|g|G]``, 128M to 512G."""
        size = options(value, "size").get("size", "")
        match = re.fullmatch(r"(\d+)([mMgG]?)", size)
        if match is None:
            raise ArgvError(f"-m: {size!r} is not <megs>[m|M|g|G]")
        mib = int(match[1]) << (10 if match[2] in "gG" and match[2] else 0)
        if not 128 <= mib <= 512 << 10:
            raise ArgvError("-m: memory must be 128M to 512G")

    def opt_kernel(self, value: str) -> None:
        """1.6: the kernel must be readable."""
        if not os.path.isfile(value):
            raise ArgvError(f"Failed to open kernel image {value}: No such file or directory")

    def opt_initrd(self, value: str) -> None:
        """1.7: the initrd must be readable."""
        if not os.path.isfile(value):
            raise ArgvError(f"Failed to open initrd {value}: No such file or directory")

    def opt_append(self, value: str) -> None:
        pass

    def opt_qmp(self, value: str) -> None:
        """qmp.md QMP Creation: ``-qmp unix:/path/to/api/socket,server,nowait``."""
        match = re.fullmatch(r"unix:([^,]+),server,nowait", value)
        if match is None:
            raise ArgvError(f"-qmp: {value!r} is not unix:<path>,server,nowait")
        self.qmp = match[1]

    def opt_pidfile(self, value: str) -> None:
        self.pidfile = value

    def opt_daemonize(self, value: str) -> None:
        raise ArgvError("-daemonize: the shim must keep StratoVirt as its child (test fake)")

    def opt_disable_seccomp(self, value: str) -> None:
        pass

    def opt_chardev(self, value: str) -> None:
        """2.12: ``-chardev socket,id=<id>,path=<socket_path>[,server,nowait]``."""
        opts = options(value, "backend")
        if opts.get("backend") != "socket":
            raise ArgvError("-chardev: this fake knows only socket chardevs")
        _allowed(opts, {"backend", "id", "path", "server", "nowait"}, "-chardev")
        if "id" not in opts or "path" not in opts:
            raise ArgvError("-chardev: id and path are required")
        if ("server" in opts) != ("nowait" in opts):
            raise ArgvError("-chardev: give server and nowait together")
        self.chardevs[opts["id"]] = opts

    def opt_serial(self, value: str) -> None:
        """2.6: ``-serial chardev:<chardev_id>``; StratoVirt listens on that chardev."""
        if not value.startswith("chardev:"):
            raise ArgvError("-serial: this fake knows only chardev:<id>")
        self.serial = self._server_chardev(value.removeprefix("chardev:"), "-serial")

    def _server_chardev(self, ident: str, what: str) -> str:
        chardev = self.chardevs.get(ident)
        if chardev is None:
            raise ArgvError(f"{what}: no chardev {ident!r} before it")
        if "server" not in chardev:
            raise ArgvError(f"Argument 'server' and 'nowait' are both required for chardev "
                            f"'{ident}'")
        return chardev["path"]

    def opt_netdev(self, value: str) -> None:
        """2.3: ``-netdev tap,id=<netdevid>`` with ``fd``/``fds``/``ifname``."""
        opts = options(value, "type")
        _allowed(opts, {"type", "id", "ifname", "fd", "fds", "queues", "vhost", "vhostfd",
                        "vhostfds", "path", "macnat"}, "-netdev")  # fmt: skip
        if opts.get("type") != "tap" or "id" not in opts:
            raise ArgvError("-netdev: tap,id=<id> expected")
        fds = opts.get("fd") or opts.get("fds")
        if not fds and not opts.get("ifname"):
            raise ArgvError("Tap device is missing, use 'ifname' or 'fd' to configure a tap")
        for fd in (fds or "").split(":") if fds else []:
            try:
                os.fstat(int(fd))
            except (ValueError, OSError) as e:
                raise ArgvError(f"-netdev: tap fd {fd} is not open: {e}") from None
        self.netdevs[opts["id"]] = opts

    def opt_drive(self, value: str) -> None:
        """2.2: ``-drive id=<drive_id>,file=<path_on_host>[,readonly=..][,direct=..]``."""
        opts = options(value)
        _allowed(opts, {"id", "file", "readonly", "direct", "serial", "iothread", "discard",
                        "detect-zeroes", "if", "format", "num-queues", "bootindex", "aio",
                        "throttling.iops-total"}, "-drive")  # fmt: skip
        if "id" not in opts or not os.path.exists(opts.get("file", "")):
            raise ArgvError(f"-drive: id and an existing file are required: {value}")
        for key in ("readonly", "direct"):
            if opts.get(key, "on") not in ("on", "off", "true", "false"):
                raise ArgvError(f"-drive: {key} must be on or off")
        self.drives[opts["id"]] = opts

    def opt_device(self, value: str) -> None:
        self.devices.append(options(value, "driver"))

    def check_device(self, d: dict[str, str]) -> None:
        """2.x: each mmio device's documented properties and references."""
        driver = d["driver"]
        props = {
            "virtio-serial-device": {"id"},
            "virtserialport": {"id", "chardev", "nr"},
            "virtconsole": {"id", "chardev", "nr"},
            "vhost-vsock-device": {"id", "guest-cid", "vhostfd"},
            "vhost-user-fs-device": {"id", "chardev", "tag"},
            "virtio-net-device": {"id", "netdev", "mac", "iothread", "rx-iothread",
                                  "tx-iothread", "mq"},
            "virtio-blk-device": {"id", "drive", "iothread", "serial", "num-queues",
                                  "bootindex"},
        }
        if driver not in props:
            raise ArgvError(f"-device: this fake does not know {driver!r} (microvm is mmio)")
        _allowed(d, props[driver] | {"driver"}, f"-device {driver}")
        getattr(self, "dev_" + driver.replace("-", "_"), lambda _: None)(d)

    def dev_virtserialport(self, d: dict[str, str]) -> None:
        """2.4: after a virtio-serial-device; nr 0 is only for virtconsole; one port on
        microvm."""
        if not any(x["driver"] == "virtio-serial-device" for x in self.devices):
            raise ArgvError("No virtio serial device specified")
        if d.get("nr") == "0":
            raise ArgvError("Port number 0 on virtio-serial devices reserved for virtconsole")
        ports = [x for x in self.devices if x["driver"] in ("virtserialport", "virtconsole")]
        if len(ports) > 1:
            raise ArgvError("Only one port is supported in microvm")
        self._server_chardev(d.get("chardev", ""), "-device virtserialport")

    def dev_vhost_vsock_device(self, d: dict[str, str]) -> None:
        """2.5: ``3<=guest_cid<u32:MAX``."""
        cid = d.get("guest-cid", "")
        if not cid.isdigit() or not 3 <= int(cid) < 2**32 - 1:
            raise ArgvError(f"-device vhost-vsock-device: bad guest-cid {cid!r}")

    def dev_vhost_user_fs_device(self, d: dict[str, str]) -> None:
        """2.17.1; mem-share=on (1.1) so virtiofsd can map guest memory."""
        chardev = self.chardevs.get(d.get("chardev", ""))
        if chardev is None or "tag" not in d or "id" not in d:
            raise ArgvError("-device vhost-user-fs-device: id, chardev and tag are required")
        if "server" in chardev:
            raise ArgvError(f"Argument 'server' or 'nowait' is not need for chardev "
                            f"'{chardev['path']}'")
        if self.machine.get("mem-share") != "on":
            raise ArgvError("When configuring the vhost-user-fs-device or vhost-user-fs-pci "
                            "device, the memory must be shared.")

    def dev_virtio_net_device(self, d: dict[str, str]) -> None:
        if d.get("netdev") not in self.netdevs or "id" not in d:
            raise ArgvError(f"Netdev: {d.get('netdev')!r} not found for net device")

    def dev_virtio_blk_device(self, d: dict[str, str]) -> None:
        if d.get("drive") not in self.drives or "id" not in d:
            raise ArgvError(f"Drive {d.get('drive')!r} not found for block device")


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    """``-flag value`` pairs; flags without a value get ''."""
    flags = {"-daemonize", "-disable-seccomp"}
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("-"):
            raise ArgvError(f"unexpected argument {flag!r}")
        if flag in flags:
            out.append((flag, ""))
            i += 1
            continue
        if i + 1 >= len(argv):
            raise ArgvError(f"{flag} needs a value")
        out.append((flag, argv[i + 1]))
        i += 2
    return out


def fake_main(argv: list[str], behaviour_json: str) -> int:
    """The fake ``stratovirt``: check argv, then run a VM that only speaks QMP."""
    behaviour = Behaviour(**json.loads(behaviour_json))
    if argv in (["-V"], ["--version"]):
        print(VERSION)
        return 0
    record = Path(behaviour.record_dir) if behaviour.record_dir else None
    if record is not None:
        (record / "argv.json").write_text(json.dumps(argv))
    try:
        vm = FakeVm(pairs(argv))
        vm.check()
        if behaviour.fail_at_start:
            raise ArgvError(behaviour.fail_at_start)
    except ArgvError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        return 1
    return run_vm(vm, behaviour, record)


def run_vm(vm: FakeVm, behaviour: Behaviour, record: Path | None) -> int:
    """Pid file, chardev listeners, virtiofsd connection, QMP until quit."""
    if vm.pidfile:
        Path(vm.pidfile).write_text(f"{os.getpid()}\n")
    stop = threading.Event()
    listeners = [listen(c["path"]) for c in vm.chardevs.values() if "server" in c]
    clients = [connect(c["path"]) for c in vm.chardevs.values() if "server" not in c]
    for sock in listeners:
        greeting = b"fake StratoVirt: " + vm.name.encode() + b" booting\r\n"
        console = sock.getsockname() == vm.serial
        threading.Thread(target=hold, args=(sock, stop, greeting if console else b""),
                         daemon=True).start()
    peer = QmpPeer(behaviour)
    qmp = listen(vm.qmp)
    try:
        peer.serve(qmp, stop)
    finally:
        stop.set()
        if record is not None:
            lines = [json.dumps(c) for c in peer.commands]
            (record / "qmp.log").write_text("".join(f"{line}\n" for line in lines))
        for sock in [qmp, *listeners, *clients]:
            sock.close()
        for path in [vm.qmp, *(c["path"] for c in vm.chardevs.values() if "server" in c)]:
            with contextlib.suppress(OSError):
                os.unlink(path)  # StratoVirt removes the sockets it made when it exits
    return 0


def listen(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (replacing a stale file)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4)
    return sock


def connect(path: str) -> socket.socket:
    """A client connection (vhost-user: StratoVirt connects to virtiofsd)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        print(f"Error: Failed to connect to vhost-user socket {path}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return sock


def hold(listener: socket.socket, stop: threading.Event, greeting: bytes) -> None:
    """Accept on a chardev socket; write ``greeting`` (the console's boot line), then hold."""
    listener.settimeout(0.05)
    held = []
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with contextlib.suppress(OSError):
            conn.sendall(greeting)
        held.append(conn)


def write_fake_stratovirt(path: Path, behaviour: Behaviour | None = None) -> Path:
    """An executable fake ``stratovirt`` at ``path`` with ``behaviour`` built in."""
    text = (f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from tests.harness.stratovirt_peer import fake_main\n"
            f"sys.exit(fake_main(sys.argv[1:], {(behaviour or Behaviour()).to_json()!r}))\n")
    path.write_text(text)
    path.chmod(0o755)
    return path


def write_fake_virtiofsd(path: Path) -> Path:
    """An executable fake virtiofsd: listens on ``--socket-path=`` until terminated."""
    text = (f"#!{sys.executable}\n"
            "import signal, socket, sys, time\n"
            "path = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--socket-path='))\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1)\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
            "conn, _ = s.accept()\n"
            "while conn.recv(4096): pass\n")  # exits when the VMM disconnects, as virtiofsd does
    path.write_text(text)
    path.chmod(0o755)
    return path
