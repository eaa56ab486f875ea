"""Configuration warnings (unknown and unsupported keys, with file and line), the
hypervisor chosen by its section, and the SandboxSpec read from an OCI spec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli import main as cli
from sandbox.config import ConfigNotFoundError, find_config, load_config, variant_of
from sandbox.errors import InvalidArgumentError
from sandbox.oci import sandbox_spec
from sandbox.types import PodResources

CONFIG = """\
[hypervisor.qemu]
default_vcpus = 1
enable_annotations = ["kernel_params"]
defualt_memory = 512
valid_hypervisor_paths = ["/usr/bin/qemu-*"]

[agent.kata]
dial_timeout = 5
kernel_modules = ["e1000e"]
debug_console = true

[runtime]
state_dir = "/run/kata-test"
internetworking_model = "macvtap"
sandbox_bind_mounts = []

[image]
service_offload = true
"""


def test_unknown_and_unsupported_keys_name_the_key_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text(CONFIG)
    config = load_config(str(path))
    assert config.hypervisor.name == "qemu"
    warnings = "\n".join(config.warnings)
    unknown = [("table [image]", 17), ("key hypervisor.qemu.defualt_memory", 4),
               ("key agent.kata.debug_console", 10), ("key runtime.sandbox_bind_mounts", 15)]
    for key, line in unknown:
        assert f"unknown {key} in {path}:{line}: ignored" in warnings, warnings
    assert f"agent.kata.kernel_modules in {path}:9 is set but not supported" in warnings
    assert "enable_annotations" not in warnings  # honoured now (hypervisors/annotations.py)
    assert "internetworking_model" not in warnings  # honoured now (network/)
    assert config.internetworking_model == "macvtap"
    assert len(config.warnings) == 5


def test_the_default_configuration_has_no_warnings() -> None:
    repo = Path(__file__).resolve().parents[2]
    assert load_config(str(repo / "configuration.toml")).warnings == ()


def test_check_shows_the_warnings_without_failing_on_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text("[hypervisor.qemu]\naccelerator = \"tcg\"\nbogus_key = 1\n")
    cli.main(["--config", str(path), "check"])
    out = capsys.readouterr().out
    assert f"warn  configuration: unknown key hypervisor.qemu.bogus_key in {path}:3" in out


@pytest.mark.parametrize(("text", "words"), [
    ("[runtime]\nstate_dir = '/x'\n", "'none' is not exactly one section"),
    ("[hypervisor.qemu]\n[hypervisor.stratovirt]\n", "is not exactly one section"),
    ("[hypervisor.cloudhv]\n", "'cloudhv' is not a hypervisor this runtime knows"),
    ("[runtime]\ninternetworking_model = 'bridged'\n[hypervisor.qemu]\n", "use one of"),
])  # fmt: skip
def test_bad_files_are_refused_with_the_file_named(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match=words) as info:
        load_config(str(path))
    assert str(path) in str(info.value)


def test_no_configuration_anywhere_is_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KATA_CONF_FILE", raising=False)
    monkeypatch.setattr("sandbox.config.DEFAULT_PATHS", (Path("/nonexistent/c.toml"),))
    with pytest.raises(ConfigNotFoundError, match="make install"):
        load_config()


def test_sandbox_spec_from_the_sandbox_containers_oci_spec() -> None:
    spec = {
        "hostname": "web-0",
        "annotations": {"io.kubernetes.cri.sandbox-memory": "268435456",
                        "io.katacontainers.config.hypervisor.default_vcpus": "2"},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}],
            "resources": {"cpu": {"quota": 50000, "period": 100000},
                          "memory": {"limit": 536870912}},
        },
    }
    got = sandbox_spec(spec)
    assert got.hostname == "web-0" and got.netns_path == "/var/run/netns/cni-1"
    assert not got.host_network
    assert got.annotations["io.katacontainers.config.hypervisor.default_vcpus"] == "2"
    # CRI's sandbox annotations win over the (pause) container's own limits.
    assert got.resources == PodResources(cpu_quota=50000, cpu_period=100000,
                                         memory_limit_bytes=268435456)


def test_a_spec_without_a_network_namespace_asks_for_the_hosts() -> None:
    no_netns = sandbox_spec({"linux": {"namespaces": [{"type": "pid"}]}})
    assert no_netns.host_network and no_netns.netns_path == ""
    new_netns = sandbox_spec({"linux": {"namespaces": [{"type": "network"}]}})
    assert not new_netns.host_network and new_netns.netns_path == ""


def test_sandbox_spec_of_a_bare_spec_and_of_junk() -> None:
    assert sandbox_spec({}).netns_path == "" and sandbox_spec({}).resources == PodResources()
    junk = {"linux": {"resources": {"cpu": {"quota": -1, "period": "x"}}, "namespaces": None},
            "annotations": ["not", "a", "map"], "hostname": None}
    got = sandbox_spec(junk)
    assert (got.hostname, got.annotations, got.resources) == ("", {}, PodResources())


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("program", "variant"), [
    ("/usr/local/bin/containerd-shim-kata-v2", ""),
    ("containerd-shim-kata-qemu-v2", "qemu"),
    ("/opt/bin/containerd-shim-kata-qemu-microvm-v2", "qemu-microvm"),
    ("containerd-shim-kata-stratovirt-v2", "stratovirt"),
    ("python3", ""),
    ("containerd-shim-kata-../x-v2", ""),
])
def test_the_shims_name_selects_a_runtime_variant(program: str, variant: str) -> None:
    assert variant_of(program) == variant


def test_a_variant_reads_its_own_file_beside_kata_conf_file_then_the_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, defaults = tmp_path / "conf", tmp_path / "defaults"
    conf.mkdir()
    defaults.mkdir()
    monkeypatch.setenv("KATA_CONF_FILE", str(conf / "configuration.toml"))
    monkeypatch.setattr("sandbox.config.DEFAULT_PATHS", (defaults / "configuration.toml",))
    (defaults / "configuration-qemu-microvm.toml").write_text("")
    assert find_config(None, "qemu-microvm") == defaults / "configuration-qemu-microvm.toml"
    (conf / "configuration-qemu-microvm.toml").write_text("")
    assert find_config(None, "qemu-microvm") == conf / "configuration-qemu-microvm.toml"
    # ConfigPath (runtime options) still wins; no variant: $KATA_CONF_FILE.
    assert find_config("/x/c.toml", "qemu-microvm") == Path("/x/c.toml")
    assert find_config(None, "") == conf / "configuration.toml"
    with pytest.raises(ConfigNotFoundError) as missing:
        find_config(None, "stratovirt")
    assert str(missing.value) == (
        "failed to find the configuration of runtime variant 'stratovirt': tried "
        f"{conf}/configuration-stratovirt.toml, {defaults}/configuration-stratovirt.toml; "
        "run `make install`, or set ConfigPath in the runtime options")


@pytest.mark.parametrize("name", ["configuration.toml", "configuration-qemu-microvm.toml",
                                  "configuration-stratovirt.toml"])
def test_every_shipped_configuration_loads_without_warnings(name: str) -> None:
    config = load_config(str(REPO / name))
    assert config.warnings == ()


def test_the_microvm_configuration_differs_from_the_default_only_in_the_machine() -> None:
    """... and in what the guest boots: microvm has no PCI for the shared root image."""
    import tomllib

    default = tomllib.loads((REPO / "configuration.toml").read_text())
    microvm = tomllib.loads((REPO / "configuration-qemu-microvm.toml").read_text())
    q35, mvm = default["hypervisor"]["qemu"], microvm["hypervisor"]["qemu"]
    assert (q35.pop("machine_type"), mvm.pop("machine_type")) == ("q35", "microvm")
    assert (q35.pop("image"), q35.pop("initrd"), mvm.pop("initrd")) == (
        "/usr/share/kata-containers/kata-containers.img",
        "/usr/share/kata-containers/kata-containers-image-loader.img",
        "/usr/share/kata-containers/kata-containers-initrd.img")
    assert "image" not in mvm
    assert q35.pop("kernel_params").replace("pci=lastbus=0", "pci=off") == \
        mvm.pop("kernel_params")
    assert default == microvm


def test_factory_table_turns_templates_on(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text('[hypervisor.qemu]\n\n[factory]\nenable_template = true\n'
                    'template_path = "/run/tpl"\nvm_cache_number = 3\ncache_size = 1\n')
    config = load_config(str(path))
    assert config.factory.template_dir == Path("/run/tpl")
    assert config.factory.vm_cache_number == 3
    assert config.factory.cache_endpoint(config.state_dir) == config.state_dir / "vm-cache.sock"
    warnings = "\n".join(config.warnings)
    assert f"unknown key factory.cache_size in {path}:7" in warnings
    assert len(config.warnings) == 1


@pytest.mark.parametrize(("line", "words"), [
    ("vm_cache_number = -1", "give 0 (no VM cache) to 64"),
    ("vm_cache_number = 65", "give 0 (no VM cache) to 64"),
    ("vm_cache_number = true", "wrong type"),
    ('vm_cache_endpoint = "cache.sock"', "give an absolute path"),
    ('vm_cache_endpoint = "/run/' + "x" * 80 + '.sock"', "at most 80 characters"),
])
def test_a_bad_vm_cache_setting_is_refused_with_what_to_give(tmp_path: Path, line: str,
                                                              words: str) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text(f"[hypervisor.qemu]\n\n[factory]\n{line}\n")
    with pytest.raises(InvalidArgumentError, match=re.escape(words)):
        load_config(str(path))


def test_the_vm_cache_endpoint_may_be_set(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text('[hypervisor.qemu]\n\n[factory]\nvm_cache_number = 1\n'
                    'vm_cache_endpoint = "/run/cache/c.sock"\n')
    config = load_config(str(path))
    assert config.factory.cache_endpoint(config.state_dir) == Path("/run/cache/c.sock")
    assert not config.warnings


def test_templates_are_off_by_default_and_need_an_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text("[hypervisor.qemu]\n")
    config = load_config(str(path))
    assert config.factory.template_dir is None and not config.factory.enable_template
    path.write_text('[hypervisor.qemu]\n[factory]\ntemplate_path = "tpl"\n')
    with pytest.raises(InvalidArgumentError, match="give an absolute path"):
        load_config(str(path))
    path.write_text('[hypervisor.qemu]\n[factory]\nenable_template = "yes"\n')
    with pytest.raises(InvalidArgumentError, match=r"enable_template .* wrong type"):
        load_config(str(path))
