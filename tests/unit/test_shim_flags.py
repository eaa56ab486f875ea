"""Go-flag-style parsing of the shim's command line."""

from __future__ import annotations

import pytest

from shim.flags import Flags, UsageError, daemon_argv, parse
from shim.main import main

START = ["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
         "-publish-binary", "/usr/bin/containerd", "-id", "c1"]  # fmt: skip


def test_containerd_start_command_line() -> None:
    flags = parse([*START, "-debug", "start"])
    assert flags == Flags(namespace="k8s.io", address="/run/containerd/containerd.sock",
                          publish_binary="/usr/bin/containerd", id="c1", debug=True,
                          action="start")  # fmt: skip


def test_delete_with_bundle() -> None:
    flags = parse([*START, "-bundle", "/b/c1", "delete"])
    assert (flags.action, flags.bundle) == ("delete", "/b/c1")


@pytest.mark.parametrize("argv", [
    ["-id=x", "start"], ["--id=x", "start"], ["--id", "x", "start"], ["-id", "x", "start"],
])  # fmt: skip
def test_value_forms(argv: list[str]) -> None:
    assert parse(argv).id == "x"


@pytest.mark.parametrize(("word", "value"), [
    ("-debug", True), ("--debug", True), ("-debug=true", True), ("-debug=1", True),
    ("-debug=false", False), ("-debug=F", False),
])  # fmt: skip
def test_boolean_forms(word: str, value: bool) -> None:
    assert parse([word]).debug is value


def test_boolean_never_takes_the_next_word() -> None:
    with pytest.raises(UsageError, match="unknown action 'false'"):
        parse(["-debug", "false"])


@pytest.mark.parametrize(("argv", "message"), [
    (["-nope", "start"], "flag provided but not defined: -nope"),
    (["-id"], "flag needs an argument: -id"),
    (["-debug=maybe"], "invalid boolean value"),
    (["---id", "x"], "bad flag syntax"),
    (["run"], "unknown action 'run'"),
    (["start", "extra"], "unexpected arguments"),
])  # fmt: skip
def test_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(argv)


def test_double_dash_ends_flags() -> None:
    assert parse(["-id", "x", "--", "delete"]).action == "delete"


def test_version_flags() -> None:
    assert parse(["-v"]).version and parse(["--version"]).version


def test_daemon_argv_round_trips() -> None:
    flags = parse([*START, "-debug", "start"])
    back = parse(daemon_argv(flags, "pod1", "/etc/kata.toml"))
    assert back.daemon and back.action == ""
    assert (back.sandbox_id, back.config_path, back.id, back.debug) == (
        "pod1", "/etc/kata.toml", "c1", True)


def test_main_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-bogus"]) == 2
    assert "flag provided but not defined" in capsys.readouterr().err


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v"]) == 0
    assert "Version:" in capsys.readouterr().out


def test_main_without_action_or_daemon_is_a_usage_error() -> None:
    assert main(START) == 2


def test_kata_runtime_unfinished_commands_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main as cli

    assert cli(["exec"]) == 2  # needs a sandbox id (tests/unit/test_debug_console.py)
    assert "sandbox-id" in capsys.readouterr().err
    assert cli([]) == 2
    assert cli(["--version"]) == 0
