"""A kubelet stand-in: CRI (runtime.v1) calls to a containerd's CRI plugin over gRPC.

    kubelet = Kubelet(cd.address)
    pod = kubelet.run_pod("web", handler="kata")
    cid = kubelet.start_container(pod, "app", ["sleep", "300"])
    res = kubelet.exec_sync(cid, ["cat", "/etc/hostname"], timeout=10)

Every call has a deadline, so a hung runtime fails the test instead of hanging it. The pod
and container configs are built the way the kubelet builds them (metadata, log paths,
Linux security context, namespace options), with only the fields a test sets differing.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hostos import cgroups
from tests.harness.cri import api_pb2 as cri
from tests.harness.cri import api_pb2_grpc as cri_grpc

DEFAULT_DEADLINE = 120.0  # seconds: a pod's VM boots under TCG within this
POD_NAMESPACE = "default"
# NamespaceMode
POD, CONTAINER, NODE = cri.NamespaceMode.POD, cri.NamespaceMode.CONTAINER, cri.NamespaceMode.NODE


@dataclass
class PodOptions:
    """What a test may set on a pod (the rest is as the kubelet sends it)."""

    hostname: str = ""
    host_network: bool = False
    dns_servers: Sequence[str] = ()
    dns_searches: Sequence[str] = ()
    dns_options: Sequence[str] = ()
    share_pid: bool = False
    sysctls: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    privileged: bool = False  # lets the pod have privileged containers
    # The sum of the containers' limits, as the kubelet reports it (LinuxPodSandboxConfig
    # resources); CRI passes it on as io.kubernetes.cri.sandbox-* annotations.
    memory_limit_bytes: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0


@dataclass
class ContainerOptions:
    """What a test may set on a container."""

    env: dict[str, str] = field(default_factory=dict)
    tty: bool = False
    stdin: bool = False
    privileged: bool = False
    add_capabilities: Sequence[str] = ()
    drop_capabilities: Sequence[str] = ()
    run_as_user: int | None = None
    run_as_group: int | None = None
    supplemental_groups: Sequence[int] = ()
    no_new_privs: bool = False
    masked_paths: Sequence[str] | None = None
    readonly_paths: Sequence[str] | None = None
    memory_limit_bytes: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class PodCgroup:
    """A pod's cgroup, made in every accounting hierarchy as the kubelet (cgroupfs driver)
    makes it; its children are the runtime's."""

    dirs: list[Path]

    @classmethod
    def make(cls, path: str) -> PodCgroup:
        found = cgroups.hierarchies(cgroups.read_mountinfo())
        dirs = [Path(h.mount_point + path) for h in found]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        return cls(dirs)

    def children(self) -> list[Path]:
        return [c for d in self.dirs if d.is_dir() for c in d.iterdir() if c.is_dir()]

    def remove(self) -> None:
        """Remove the pod's cgroup and the parents this made, up to the hierarchy's root."""
        roots = {h.mount_point for h in cgroups.hierarchies(cgroups.read_mountinfo())}
        for d in self.dirs:
            level = d
            while str(level) not in roots and level != level.parent:
                cgroups.remove_dir(str(level))
                level = level.parent


@dataclass
class Pod:
    id: str
    config: cri.PodSandboxConfig
    log_dir: Path


class Kubelet:
    """CRI client on containerd's gRPC socket (the CRI plugin shares it)."""

    def __init__(self, address: str, log_root: Path, deadline: float = DEFAULT_DEADLINE) -> None:
        self.address = address
        self.log_root = log_root
        self.deadline = deadline
        self.pod_cgroups: list[PodCgroup] = []
        self.reconnect()

    def reconnect(self) -> None:
        """A new channel (after containerd restarted, as the kubelet redials)."""
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the runtime reports RuntimeReady, as the kubelet does before it
        syncs pods: after a restart the CRI plugin answers "server is not initialized yet"
        until it has recovered its pods."""
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            try:
                status = self.runtime.Status(cri.StatusRequest(), timeout=5).status
                ready = {c.type: c.status for c in status.conditions}
                if ready.get("RuntimeReady"):
                    return
                last = str(status)
            except grpc.RpcError as e:
                last = f"{e.code()}: {e.details()}"
            time.sleep(0.1)
        raise TimeoutError(f"the CRI runtime was not ready within {timeout}s: {last}")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Kubelet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pods ----------------------------------------------------------------------------

    def pod_config(self, name: str, opts: PodOptions) -> cri.PodSandboxConfig:
        uid = str(uuid.uuid4())
        log_dir = self.log_root / f"{POD_NAMESPACE}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        network = NODE if opts.host_network else POD
        namespaces = cri.NamespaceOption(network=network, pid=POD if opts.share_pid else CONTAINER,
                                         ipc=POD)
        linux = cri.LinuxPodSandboxConfig(
            cgroup_parent=opts.cgroup_parent, sysctls=opts.sysctls,
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=namespaces,
                                                             privileged=opts.privileged),
        )
        if opts.memory_limit_bytes or opts.cpu_quota:
            linux.resources.CopyFrom(cri.LinuxContainerResources(
                memory_limit_in_bytes=opts.memory_limit_bytes, cpu_quota=opts.cpu_quota,
                cpu_period=opts.cpu_period))
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE,
                                            attempt=0),
            hostname=opts.hostname or name, log_directory=str(log_dir),
            labels={"io.kubernetes.pod.name": name}, annotations=opts.annotations, linux=linux,
            dns_config=cri.DNSConfig(servers=list(opts.dns_servers),
                                     searches=list(opts.dns_searches),
                                     options=list(opts.dns_options)),
        )

    def run_pod(self, name: str, handler: str, opts: PodOptions | None = None,
                timeout: float | None = None) -> Pod:
        opts = opts or PodOptions()
        if opts.cgroup_parent:  # the kubelet makes the pod's cgroup before RunPodSandbox
            self.pod_cgroups.append(PodCgroup.make(opts.cgroup_parent))
        config = self.pod_config(name, opts)
        res = self.runtime.RunPodSandbox(
            cri.RunPodSandboxRequest(config=config, runtime_handler=handler),
            timeout=timeout or self.deadline)
        return Pod(res.pod_sandbox_id, config, Path(config.log_directory))

    def pod_status(self, pod_id: str) -> cri.PodSandboxStatus:
        req = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=False)
        return self.runtime.PodSandboxStatus(req, timeout=self.deadline).status

    def list_pods(self) -> list[cri.PodSandbox]:
        return list(self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(),
                                                timeout=self.deadline).items)

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=self.deadline)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=self.deadline)

    def list_pod_stats(self) -> list[cri.PodSandboxStats]:
        return list(self.runtime.ListPodSandboxStats(cri.ListPodSandboxStatsRequest(),
                                                     timeout=self.deadline).stats)

    def pod_stats(self, pod_id: str) -> cri.PodSandboxStats:
        return self.runtime.PodSandboxStats(
            cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=self.deadline).stats

    # -- containers ----------------------------------------------------------------------

    def container_config(self, name: str, image: str, command: Sequence[str],
                         opts: ContainerOptions,
                         namespaces: cri.NamespaceOption | None = None) -> cri.ContainerConfig:
        caps = cri.Capability(add_capabilities=list(opts.add_capabilities),
                              drop_capabilities=list(opts.drop_capabilities))
        sc = cri.LinuxContainerSecurityContext(
            capabilities=caps, privileged=opts.privileged,
            supplemental_groups=list(opts.supplemental_groups), no_new_privs=opts.no_new_privs,
            namespace_options=namespaces)
        if opts.run_as_user is not None:
            sc.run_as_user.value = opts.run_as_user
        if opts.run_as_group is not None:
            sc.run_as_group.value = opts.run_as_group
        if opts.masked_paths is not None:
            sc.masked_paths.extend(opts.masked_paths)
        if opts.readonly_paths is not None:
            sc.readonly_paths.extend(opts.readonly_paths)
        resources = cri.LinuxContainerResources(
            memory_limit_in_bytes=opts.memory_limit_bytes, cpu_quota=opts.cpu_quota,
            cpu_period=opts.cpu_period)
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=image), command=list(command),
            envs=[cri.KeyValue(key=k, value=v) for k, v in opts.env.items()],
            log_path=f"{name}/0.log", tty=opts.tty, stdin=opts.stdin,
            labels={"io.kubernetes.container.name": name}, annotations=opts.annotations,
            linux=cri.LinuxContainerConfig(resources=resources, security_context=sc),
        )

    def create_container(self, pod: Pod, name: str, image: str, command: Sequence[str],
                         opts: ContainerOptions | None = None) -> str:
        (pod.log_dir / name).mkdir(exist_ok=True)
        # As the kubelet does: the container's namespace modes are the pod's.
        namespaces = pod.config.linux.security_context.namespace_options
        config = self.container_config(name, image, command, opts or ContainerOptions(),
                                       namespaces)
        req = cri.CreateContainerRequest(pod_sandbox_id=pod.id, config=config,
                                         sandbox_config=pod.config)
        return str(self.runtime.CreateContainer(req, timeout=self.deadline).container_id)

    def start_container(self, pod: Pod, name: str, image: str, command: Sequence[str],
                        opts: ContainerOptions | None = None) -> str:
        cid = self.create_container(pod, name, image, command, opts)
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid),
                                    timeout=self.deadline)
        return cid

    def container_status(self, cid: str) -> cri.ContainerStatus:
        req = cri.ContainerStatusRequest(container_id=cid)
        return self.runtime.ContainerStatus(req, timeout=self.deadline).status

    def list_containers(self, pod_id: str = "") -> list[cri.Container]:
        flt = cri.ContainerFilter(pod_sandbox_id=pod_id)
        return list(self.runtime.ListContainers(cri.ListContainersRequest(filter=flt),
                                                timeout=self.deadline).containers)

    def stop_container(self, cid: str, timeout: int = 10) -> None:
        self.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=timeout),
                                   timeout=self.deadline)

    def remove_container(self, cid: str) -> None:
        self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid),
                                     timeout=self.deadline)

    def exec_sync(self, cid: str, cmd: Sequence[str], timeout: int = 0) -> cri.ExecSyncResponse:
        req = cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout)
        return self.runtime.ExecSync(req, timeout=self.deadline)

    def exec_url(self, cid: str, cmd: Sequence[str], tty: bool = False) -> str:
        """Exec through the streaming server: the URL to connect to (streaming.stream)."""
        req = cri.ExecRequest(container_id=cid, cmd=list(cmd), tty=tty, stdout=True,
                              stderr=not tty)
        return str(self.runtime.Exec(req, timeout=self.deadline).url)

    def attach_url(self, cid: str) -> str:
        """Attach to a running container's output through the streaming server."""
        req = cri.AttachRequest(container_id=cid, stdout=True, stderr=True)
        return str(self.runtime.Attach(req, timeout=self.deadline).url)

    def port_forward_url(self, pod_id: str, port: int) -> str:
        """PortForward through the streaming server (streaming.port_forward)."""
        req = cri.PortForwardRequest(pod_sandbox_id=pod_id, port=[port])
        return str(self.runtime.PortForward(req, timeout=self.deadline).url)

    def container_stats(self, cid: str) -> cri.ContainerStats:
        req = cri.ContainerStatsRequest(container_id=cid)
        return self.runtime.ContainerStats(req, timeout=self.deadline).stats

    def list_container_stats(self, pod_id: str = "") -> list[cri.ContainerStats]:
        flt = cri.ContainerStatsFilter(pod_sandbox_id=pod_id)
        return list(self.runtime.ListContainerStats(cri.ListContainerStatsRequest(filter=flt),
                                                    timeout=self.deadline).stats)

    def update_resources(self, cid: str, resources: cri.LinuxContainerResources) -> None:
        req = cri.UpdateContainerResourcesRequest(container_id=cid, linux=resources)
        self.runtime.UpdateContainerResources(req, timeout=self.deadline)

    def reopen_log(self, cid: str) -> None:
        self.runtime.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=cid),
                                        timeout=self.deadline)

    # -- clean-up ------------------------------------------------------------------------

    def remove_all(self) -> None:
        """Stop and remove every pod (and so every container), as a node drain would; then
        the pod cgroups this kubelet made."""
        for pod in self.list_pods():
            with contextlib.suppress(grpc.RpcError):
                self.stop_pod(pod.id)
            with contextlib.suppress(grpc.RpcError):
                self.remove_pod(pod.id)
        for cgroup in self.pod_cgroups:
            cgroup.remove()
        self.pod_cgroups.clear()


@contextlib.contextmanager
def kubelet(address: str, log_root: Path) -> Iterator[Kubelet]:
    k = Kubelet(address, log_root)
    try:
        yield k
    finally:
        with contextlib.suppress(Exception):
            k.remove_all()
        k.close()
