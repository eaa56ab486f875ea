"""agent.validate and agent.spec: what the host may and may not send."""

from __future__ import annotations

import json

import pytest

from agent.errors import InvalidArgument
from agent.spec import (
    check_process,
    grant_guest_devices,
    guest_devices,
    is_privileged,
    parse_json_object,
    rewrite_spec,
    sysctl_path,
    take_net_sysctls,
)
from agent.validate import MAX_READ, check_exec_id, check_guest_path, check_id, read_len

RUN = "/run/kata-containers"


@pytest.mark.parametrize("good", ["a", "c1", "A.b-c_d", "0" * 128])
def test_ids_accepted(good: str) -> None:
    assert check_id("container_id", good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "-x", "a/b", "../x", "a b", "x\n", "0" * 129])
def test_ids_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="container_id"):
        check_id("container_id", bad)


def test_exec_id_empty_means_init() -> None:
    assert check_exec_id("") == ""
    with pytest.raises(InvalidArgument):
        check_exec_id("../e")


@pytest.mark.parametrize("path", [RUN, f"{RUN}/shared/x", f"{RUN}//a/./b"])
def test_guest_paths_under_root(path: str) -> None:
    assert check_guest_path("p", path, RUN).startswith(RUN)


@pytest.mark.parametrize("path", ["relative", "/etc", f"{RUN}/../../etc", f"{RUN}-other/x",
                                  f"{RUN}/a\0b"])
def test_guest_paths_escaping(path: str) -> None:
    with pytest.raises(InvalidArgument):
        check_guest_path("p", path, RUN)


def test_read_len_is_capped() -> None:
    assert read_len(0) == MAX_READ
    assert read_len(10) == 10
    assert read_len(1 << 30) == MAX_READ


def _spec(**overrides: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "root": {"path": f"{RUN}/shared/containers/c1/rootfs"},
        "process": {"args": ["sh"], "terminal": False},
        "hooks": {"prestart": [{"path": "/host/hook"}]},
        "linux": {
            "cgroupsPath": "/host/slice:cri:c1",
            "namespaces": [
                {"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"},
                {"type": "network"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "mount"},
            ],
        },
    }
    spec.update(overrides)
    return spec


def test_spec_rewrite() -> None:
    original = _spec()
    spec = rewrite_spec(original, "c1", RUN, "/kata", terminal=True)
    assert spec["linux"]["cgroupsPath"] == "/kata/c1"
    assert spec["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}]
    assert "hooks" not in spec
    assert spec["process"]["terminal"] is True
    assert original["hooks"]  # the input is not modified


def test_the_container_gets_an_execution_domain_unless_it_names_one() -> None:
    """crun may run without address-space randomisation; a named domain makes it reset the
    personality (flags cleared) before it execs the container's processes."""
    assert rewrite_spec(_spec(), "c1", RUN, None, terminal=False)["linux"]["personality"] == {
        "domain": "LINUX"}
    own = {"domain": "LINUX32"}
    spec = rewrite_spec(_spec(linux={"personality": own}), "c1", RUN, None, terminal=False)
    assert spec["linux"]["personality"] == own
    spec = rewrite_spec(_spec(linux={"personality": "junk"}), "c1", RUN, None, terminal=False)
    assert spec["linux"]["personality"] == {"domain": "LINUX"}


POD_MEMBER = {"io.kubernetes.cri.container-type": "container",
              "io.kubernetes.cri.sandbox-id": "pod1"}
HOST_NAMESPACES = [
    {"type": "pid", "path": "/proc/77/ns/pid"}, {"type": "network", "path": "/run/netns/x"},
    {"type": "ipc", "path": "/proc/77/ns/ipc"}, {"type": "uts", "path": "/proc/77/ns/uts"},
    {"type": "mount"}, {"type": "cgroup", "path": "/proc/77/ns/cgroup"},
]


def test_a_pod_member_joins_the_sandbox_containers_namespaces_in_the_guest() -> None:
    spec = rewrite_spec(_spec(annotations=POD_MEMBER,
                              linux={"namespaces": HOST_NAMESPACES}), "c2", RUN, None,
                        terminal=False, sandbox_pid=42)
    assert spec["linux"]["namespaces"] == [
        {"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"},
    ]


def test_a_pod_member_whose_sandbox_is_not_running_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="sandbox container 'pod1' is not running"):
        rewrite_spec(_spec(annotations=POD_MEMBER, linux={"namespaces": HOST_NAMESPACES}),
                     "c2", RUN, None, terminal=False, sandbox_pid=None)


@pytest.mark.parametrize("annotations", [
    {}, {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "c2"},
    {"io.kubernetes.cri.container-type": "container"},
])
def test_host_namespace_paths_of_others_are_dropped(annotations: dict[str, str]) -> None:
    spec = rewrite_spec(_spec(annotations=annotations, linux={"namespaces": HOST_NAMESPACES}),
                        "c2", RUN, None, terminal=False, sandbox_pid=42)
    assert spec["linux"]["namespaces"] == [{"type": "mount"}]


def test_spec_rewrite_without_cgroups() -> None:
    spec = rewrite_spec(_spec(), "c1", RUN, None, terminal=False)
    assert "cgroupsPath" not in spec["linux"]


@pytest.mark.parametrize("override", [
    {"root": {"path": "/etc"}}, {"root": {"path": f"{RUN}/../x"}}, {"root": None},
    {"process": {"args": []}}, {"process": None}, {"linux": []},
])
def test_spec_rejected(override: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        rewrite_spec(_spec(**override), "c1", RUN, "/kata", terminal=False)


def test_parse_json_object() -> None:
    assert parse_json_object("x", json.dumps({"a": 1}).encode()) == {"a": 1}
    for bad in (b"[1]", b"{", b"\xff"):
        with pytest.raises(InvalidArgument):
            parse_json_object("x", bad)


def test_check_process() -> None:
    assert check_process({"args": ["ls"]})["cwd"] == "/"
    for bad in ({}, {"args": []}, {"args": "ls"}, {"args": [1]}):
        with pytest.raises(InvalidArgument):
            check_process(bad)


def test_net_sysctls_are_taken_out_for_the_vm() -> None:
    spec = _spec(linux={"sysctl": {"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"}})
    assert take_net_sysctls(spec) == {"net.ipv4.ip_forward": "1"}
    assert spec["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}
    assert sysctl_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert take_net_sysctls(_spec(linux={})) == {}


@pytest.mark.parametrize("name", ["net.../../etc", "net./x", "net.ipv4/../../x", "net.A.b"])
def test_odd_sysctl_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid sysctl"):
        take_net_sysctls(_spec(linux={"sysctl": {name: "1"}}))


SYSFS = {"destination": "/sys", "type": "sysfs", "source": "sysfs"}
ALL_CAPS = {"args": ["sh"], "capabilities": {"bounding": ["CAP_CHOWN", "CAP_SYS_ADMIN"]}}


def test_privileged_is_cap_sys_admin_and_a_writable_sys() -> None:
    assert is_privileged(_spec(mounts=[SYSFS | {"options": ["nosuid"]}], process=ALL_CAPS))
    assert not is_privileged(_spec(mounts=[SYSFS | {"options": ["ro"]}], process=ALL_CAPS))
    assert not is_privileged(_spec(mounts=[SYSFS], process={"args": ["sh"]}))
    spec = _spec(linux={"resources": {"devices": [{"allow": False, "access": "rwm"}]}})
    grant_guest_devices(spec, [{"path": "/dev/ttyS0"}])
    assert spec["linux"]["devices"] == [{"path": "/dev/ttyS0"}]
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]


def test_guest_devices_leave_out_the_agents_channel() -> None:
    devices = guest_devices([("ttyS0", "c", 4, 64, 0o620), ("vport0p1", "c", 244, 1, 0o600),
                             ("vda", "b", 254, 0, 0o660)])
    assert [d["path"] for d in devices] == ["/dev/ttyS0", "/dev/vda"]
    assert devices[0] == {"path": "/dev/ttyS0", "type": "c", "major": 4, "minor": 64,
                          "fileMode": 0o620, "uid": 0, "gid": 0}
