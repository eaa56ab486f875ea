"""A private containerd for tests: own root, state, socket, log; cleans up after itself.

    with Containerd(extra_env={"KATA_CONF_FILE": conf}) as cd:
        cd.import_image(tar)
        cd.ctr("run", "--rm", "--runtime", "io.containerd.runc.v2", IMAGE_REF, "t1", "echo", "hi")

Everything lives under a short temp dir (/run/ktest-XXXX: unix socket paths are limited to
108 bytes). containerd's environment carries KTEST_SCOPE=<that dir>, which its shims and
their children (QEMU, virtiofsd) inherit: that is how leak checks and cleanup find them
without touching other sessions' processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.harness import mounts, procs

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
#: Where the runtime's programs (containerd-shim-kata-v2, kata-runtime) come from: the source
#: tree's venv, or another install, e.g. the frozen bundle (`make test-frozen`).
RUNTIME_BIN = Path(os.environ.get("KATA_TEST_BIN") or VENV_BIN).resolve()
SHIM_SOCKET_DIR = Path("/run/containerd/s")
RUNC_ROOT = Path("/run/containerd/runc")  # runc shim's default: <root>/<namespace>/<id>
CTR_TIMEOUT = 120.0
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
OWNER_FILE = "owner.pid"  # the test process that owns an instance (see reap_stale)


class CtrTimeout(AssertionError):
    """A ctr call did not finish in time (a hung shim fails the test, it does not hang CI)."""


def shim_socket(address: str, namespace: str, group_id: str) -> Path:
    """Where a shim started by this containerd listens (containerd 1.6 `SocketAddress`)."""
    digest = hashlib.sha256(f"{address}/{namespace}/{group_id}".encode()).hexdigest()
    return SHIM_SOCKET_DIR / digest


def free_port() -> int:
    """A TCP port free on loopback now (containerd puts the streaming server's configured
    port in the URLs it hands out, so "0" would give unusable URLs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: CAP_SYS_RESOURCE's bit in /proc/<pid>/status CapEff (linux/capability.h).
CAP_SYS_RESOURCE = 24


def can_lower_oom_scores(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process may set an oom_score_adj below its own (CAP_SYS_RESOURCE)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def config_toml(enable_cri: bool, snapshotter: str = "overlayfs", cni_dir: str = "",
                sandbox_image: str = "") -> str:
    """A version-2 configuration. With CRI: a free streaming port (instances run side by
    side), our own CNI directories (never the host's) and a locally built pause image. On
    a host whose root cannot lower an oom_score_adj (no CAP_SYS_RESOURCE, as in some
    containers), CRI keeps every container's at or above containerd's own, as it does
    rootless: its pause container's -998 would make runc's init die ("can't get final
    child's PID from pipe: EOF")."""
    disabled = "[]" if enable_cri else f'["{CRI_PLUGIN}"]'
    text = (
        "version = 2\n"
        f"disabled_plugins = {disabled}\n"
    )
    if enable_cri:
        text += (
            f"[plugins.\"{CRI_PLUGIN}\"]\n"
            f"  restrict_oom_score_adj = {str(not can_lower_oom_scores()).lower()}\n"
            "  stream_server_address = \"127.0.0.1\"\n"
            f"  stream_server_port = \"{free_port()}\"\n"
            f"  sandbox_image = \"{sandbox_image}\"\n"
            f"[plugins.\"{CRI_PLUGIN}\".cni]\n"
            f"  bin_dir = \"/usr/lib/cni\"\n"
            f"  conf_dir = \"{cni_dir}\"\n"
        )
    text += (
        f"[plugins.\"{CRI_PLUGIN}\".containerd]\n"
        f"  snapshotter = \"{snapshotter}\"\n"
    )
    return text


CNI_CONF = "10-ktest.conflist"


def write_cni_config(directory: Path, bridge: str, ipam_dir: Path) -> None:
    """A bridge network with host-local addresses in a random 10.x.y.0/24, private to one
    containerd: CRI needs a pod network (an eth0 with an address) to run a pod. The bridge
    holds the gateway address (.1, the pods' default route); no masquerading, so nothing
    beyond this machine is reachable. Kept across restarts (pods keep their addresses)."""
    if (directory / CNI_CONF).exists():
        return
    subnet = f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(256)}.0/24"
    conf = {"cniVersion": "0.4.0", "name": f"ktest-{bridge}", "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                 "dataDir": str(ipam_dir)},
    }]}
    (directory / CNI_CONF).write_text(json.dumps(conf, indent=1))


def cni_gateway(directory: Path) -> str:
    """The bridge's (gateway) address of an instance's CNI network."""
    conf = json.loads((directory / CNI_CONF).read_text())
    subnet = conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]
    return str(next(ipaddress.ip_network(subnet).hosts()))


def _bridge_of(cni_dir: Path) -> str:
    """The bridge named in an instance's CNI configuration ("" if none)."""
    try:
        conf = json.loads((cni_dir / CNI_CONF).read_text())
        return str(conf["plugins"][0]["bridge"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


def delete_link(name: str) -> None:
    subprocess.run(["ip", "link", "delete", name], capture_output=True, timeout=30, check=False)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Containerd:
    """A containerd instance of our own. Use as a context manager."""

    def __init__(self, extra_env: Mapping[str, str] | None = None, namespace: str | None = None,
                 enable_cri: bool = False, log_level: str = "debug",
                 base_dir: str = "/run") -> None:
        self.extra_env = dict(extra_env or {})
        # A namespace of our own: runc keeps container state in the host-global
        # /run/containerd/runc/<namespace>/<id>, shared by every containerd.
        self.namespace = namespace or f"ktest-{secrets.token_hex(4)}"
        self.enable_cri = enable_cri
        self.log_level = log_level
        self.dir = Path(tempfile.mkdtemp(prefix="ktest-", dir=base_dir))
        self.root, self.state = self.dir / "root", self.dir / "state"
        self.address = str(self.dir / "c.sock")
        self.config_path, self.log_path = self.dir / "config.toml", self.dir / "containerd.log"
        self.events_path = self.dir / "events.log"
        (self.dir / OWNER_FILE).write_text(str(os.getpid()))
        self.proc: subprocess.Popen[bytes] | None = None
        self._events: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []
        self.sandbox_image = ""
        # CRI pods get a network namespace with a veth on this test's own bridge (no
        # other address is ever reached); removed in close().
        self.bridge = f"kt{secrets.token_hex(4)}"
        # Run after the configuration is written, before containerd starts (e.g. to add a
        # CRI runtime handler the way an operator would).
        self.config_hooks: list[Callable[[Path], None]] = []

    def _adopt(self, directory: Path) -> None:
        """Point at an existing instance's directory (only to clean it up)."""
        self.extra_env, self.namespace, self.dir = {}, "", directory
        self.root, self.state = directory / "root", directory / "state"
        self.address = str(directory / "c.sock")
        self.config_path, self.log_path = directory / "config.toml", directory / "containerd.log"
        self.events_path = directory / "events.log"
        self.proc = self._events = None
        self._files = []
        self.sandbox_image, self.config_hooks = "", []
        self.bridge = _bridge_of(directory / "cni")

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Containerd:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{RUNTIME_BIN}:{env.get('PATH', '')}:/usr/local/sbin:/usr/sbin:/sbin"
        env.update(self.extra_env)
        env["KTEST_SCOPE"] = str(self.dir)
        return env

    def start(self, timeout: float = 30.0) -> None:
        cni_dir = self.dir / "cni"
        cni_dir.mkdir(exist_ok=True)
        if self.enable_cri:
            write_cni_config(cni_dir, self.bridge, self.dir / "cni-ipam")
        self.config_path.write_text(config_toml(self.enable_cri, cni_dir=str(cni_dir),
                                                sandbox_image=self.sandbox_image))
        for hook in self.config_hooks:
            hook(self.config_path)
        log = self._open(self.log_path)
        argv = ["containerd", "--config", str(self.config_path), "--root", str(self.root),
                "--state", str(self.state), "--address", self.address,
                "--log-level", self.log_level]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=self.env, start_new_session=True)
        if not procs.wait_until(self._ready, timeout, interval=0.05):
            raise RuntimeError(f"containerd did not answer within {timeout}s "
                               f"(exit={self.proc.poll()}):\n{self.log_tail()}")
        self._events = self.ctr_popen("events", stdout=self._open(self.events_path),
                                      stderr=subprocess.STDOUT)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop containerd (SIGTERM, as a service manager would) and start it again on the
        same root and state: running shims must survive and be adopted again."""
        for p in (self._events, self.proc):
            if p is not None:
                _stop(p)
        self.start(timeout)

    def _open(self, path: Path) -> IO[bytes]:
        f = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._files.append(f)
        return f

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")
        return self.ctr("version", timeout=5, check_timeout=False).returncode == 0

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    # -- ctr -----------------------------------------------------------------------------

    def ctr_argv(self, *args: str, namespace: str | None = None) -> list[str]:
        return ["ctr", "--address", self.address, "--namespace", namespace or self.namespace,
                *args]

    def ctr(self, *args: str, input: str | None = None, timeout: float = CTR_TIMEOUT,
            namespace: str | None = None, check: bool = False,
            check_timeout: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ctr against this containerd; stdout and stderr are captured apart.

        stdin is `input` (or /dev/null). A timeout raises CtrTimeout (an AssertionError).
        """
        argv = self.ctr_argv(*args, namespace=namespace)
        try:
            res = subprocess.run(argv, input=input, capture_output=True, text=True,
                                 timeout=timeout, env=self.env,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            if not check_timeout:
                return subprocess.CompletedProcess(argv, -1, "", "timeout")
            raise CtrTimeout(f"`{' '.join(argv)}` did not finish within {timeout}s; "
                             f"stdout={exc.stdout!r} stderr={exc.stderr!r}") from exc
        if check and res.returncode != 0:
            raise AssertionError(f"`{' '.join(argv)}` exited {res.returncode}:\n"
                                 f"stdout: {res.stdout}\nstderr: {res.stderr}")
        return res

    def ctr_popen(self, *args: str, namespace: str | None = None,
                  **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ctr without waiting (interactive use: ptys, `ctr events`, `run -d`)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("env", self.env)
        argv = self.ctr_argv(*args, namespace=namespace)
        return subprocess.Popen(argv, **kwargs)

    def import_image(self, tar: Path, ref: str | None = None) -> None:
        """Import an OCI archive and unpack it into the default snapshotter."""
        self.ctr("image", "import", str(tar), check=True)
        if ref is not None:
            listed = self.ctr("image", "ls", "-q", check=True).stdout.split()
            if ref not in listed:
                raise AssertionError(f"image {ref} not listed after import: {listed}")

    # -- queries used by tests and leak checks ---------------------------------------------

    def tasks(self, namespace: str | None = None) -> dict[str, str]:
        """Task id -> status (RUNNING, STOPPED, ...)."""
        out = self.ctr("task", "ls", namespace=namespace, check=True).stdout.splitlines()[1:]
        return {f[0]: f[2] for f in (line.split() for line in out) if len(f) >= 3}

    def containers(self, namespace: str | None = None) -> list[str]:
        return self.ctr("container", "ls", "-q", namespace=namespace, check=True).stdout.split()

    def namespaces(self) -> list[str]:
        return self.ctr("namespace", "ls", "-q").stdout.split() or [self.namespace]

    def created_containers(self) -> set[tuple[str, str]]:
        """(namespace, id) of every container ever created here, from `ctr events`."""
        seen: set[tuple[str, str]] = set()
        with contextlib.suppress(OSError):
            for line in self.events_path.read_text(errors="replace").splitlines():
                head, brace, body = line.partition(" {")  # <time> <ns> <topic> {json}
                words = head.split()
                if brace and len(words) >= 2 and words[-1] == "/containers/create":
                    with contextlib.suppress(ValueError):
                        seen.add((words[-2], str(json.loads("{" + body).get("id"))))
        return seen

    def shim_sockets(self) -> list[Path]:
        """Shim sockets this containerd may have caused (existing files only)."""
        paths = [shim_socket(self.address, ns, cid) for ns, cid in self.created_containers()]
        return [p for p in paths if p.exists()]

    def shim_processes(self) -> list[procs.Proc]:
        return [p for p in procs.processes() if "-address" in p.argv
                and self.address in p.argv and "containerd-shim" in p.cmdline]

    # -- cleanup -------------------------------------------------------------------------

    def reset(self, timeout: float = 60.0) -> None:
        """Kill and delete every task and container (containerd keeps running)."""
        for ns in self.namespaces():
            for cid in self.tasks(ns):
                self.ctr("task", "kill", "--all", "-s", "SIGKILL", cid, namespace=ns,
                         timeout=timeout)
            for cid in self.tasks(ns):
                procs.wait_until(functools.partial(self._not_running, ns, cid), 10)
                self.ctr("task", "delete", "--force", cid, namespace=ns, timeout=timeout)
            for cid in self.containers(ns):
                self.ctr("container", "delete", cid, namespace=ns, timeout=timeout)

    def _not_running(self, namespace: str, cid: str) -> bool:
        return self.tasks(namespace).get(cid) != "RUNNING"

    def close(self) -> None:
        """Stop everything this instance started and remove its directories. Idempotent,
        and works when containerd already crashed or a test left tasks running."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.reset(timeout=30)
        for p in (self._events, self.proc):
            if p is not None:
                _stop(p)
        procs.kill_all(p.pid for p in procs.processes()
                       if p.argv[:1] in (("containerd",), ("ctr",)) and self.address in p.argv)
        self._kill_scoped()
        self._delete_runc_state()
        mounts.unmount_under([str(self.dir)])
        if self.bridge:
            delete_link(self.bridge)
        for sock in self.shim_sockets():
            with contextlib.suppress(OSError):
                sock.unlink()
        for f in self._files:
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def runc_state(self) -> list[Path]:
        """runc containers left in our namespaces (their processes outlive a killed shim)."""
        found: list[Path] = []
        for ns in {self.namespace} | {ns for ns, _ in self.created_containers()}:
            if (RUNC_ROOT / ns).is_dir():
                found += sorted((RUNC_ROOT / ns).iterdir())
        return found

    def _delete_runc_state(self) -> None:
        for state in self.runc_state():
            subprocess.run(["runc", "--root", str(state.parent), "delete", "--force",
                            state.name], capture_output=True, timeout=30, check=False)
            shutil.rmtree(state, ignore_errors=True)
        for ns in {self.namespace} | {ns for ns, _ in self.created_containers()}:
            with contextlib.suppress(OSError):
                (RUNC_ROOT / ns).rmdir()

    def _kill_scoped(self) -> None:
        """SIGKILL shims of this containerd and anything that inherited its KTEST_SCOPE."""
        marker = f"KTEST_SCOPE={self.dir}\n"
        for _ in range(3):
            victims = {p.pid for p in self.shim_processes()}
            victims |= {p.pid for p in procs.processes()
                        if marker in procs.environ_of(p.pid) + "\n" and p.pid != os.getpid()}
            if not victims:
                return
            procs.kill_all(victims)
            procs.wait_until(functools.partial(procs.all_gone, victims), 5)


def _owner_gone(directory: Path) -> bool:
    try:
        return not procs.alive(int((directory / OWNER_FILE).read_text()))
    except (OSError, ValueError):
        return time.time() - directory.stat().st_mtime > 60


def reap_stale(base_dir: str = "/run") -> list[Path]:
    """Clean up instances whose owning test process died without cleaning up (e.g. a CI
    timeout killed pytest with SIGKILL). Instances of live sessions are left alone."""
    reaped = []
    for directory in sorted(Path(base_dir).glob("ktest-*")):
        if directory.is_dir() and _owner_gone(directory):
            stale = Containerd.__new__(Containerd)
            stale._adopt(directory)
            stale.close()
            reaped.append(directory)
    return reaped


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def wait_task_status(cd: Containerd, cid: str, statuses: Sequence[str],
                     timeout: float = 30.0, namespace: str | None = None) -> str:
    """Poll `ctr task ls` until task `cid` has one of `statuses` ("" stands for: no such
    task). Returns the last status seen."""
    last = [""]

    def check() -> bool:
        last[0] = cd.tasks(namespace).get(cid, "")
        return last[0] in statuses

    procs.wait_until(check, timeout)
    return last[0]
