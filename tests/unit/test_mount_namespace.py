"""private_mount_namespace: a "/" that is not a mount point (a plain chroot) is refused
with an error that says so and how to fix it; other errors pass through unchanged."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from hostos import syscalls


class FakeLib:
    def unshare(self, flags: int) -> int:
        return 0


def failing_mount(code: int) -> Any:
    def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
        raise OSError(code, "mount failed", target)
    return mount


@pytest.fixture
def no_unshare(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(syscalls, "_lib", lambda: (None, FakeLib()))
    return monkeypatch


def test_a_root_that_is_not_a_mount_point_is_explained(no_unshare: pytest.MonkeyPatch) -> None:
    no_unshare.setattr(syscalls, "mount", failing_mount(errno.EINVAL))
    with pytest.raises(OSError) as raised:
        syscalls.private_mount_namespace()
    assert raised.value.errno == errno.EINVAL
    assert "not a mount point" in str(raised.value) and "bind-mount" in str(raised.value)


def test_other_mount_errors_pass_through(no_unshare: pytest.MonkeyPatch) -> None:
    no_unshare.setattr(syscalls, "mount", failing_mount(errno.EPERM))
    with pytest.raises(PermissionError):
        syscalls.private_mount_namespace()
