"""Kata e2e: host bind mounts (`ctr run --mount`) reach the container through the share,
read-write or read-only, files and directories; nothing stays mounted afterwards; what the
host changes in a volume reaches a running container (the shipped virtio-fs cache mode)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.harness.kata import Kata
from tests.harness.scenarios import (
    BOOT_TIMEOUT,
    IMAGE_REF,
    KATA,
    explain,
    remove,
    run_rm_args,
    wait_task_status,
)

#: How long a host-side change may take to show in the guest: the shipped configuration's
#: virtiofsd timeout is 1 s; the rest is slack for a loaded host.
CHANGE_SEEN_WITHIN = 10.0


def test_bind_mounts_reach_the_container(kata: Kata, tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "hello").write_text("from the host\n")
    note = tmp_path / "note.txt"
    note.write_text("a single file\n")
    script = ("cat /ro/hello /note.txt; echo from-guest > /rw/out; "
              "if echo x > /ro/denied 2>/dev/null; then echo RO-WRITABLE; fi")
    res = run_rm_args(kata.cd, KATA, [
        "--mount", f"type=bind,src={rw},dst=/rw,options=rbind:rw",
        "--mount", f"type=bind,src={ro},dst=/ro,options=rbind:ro",
        "--mount", f"type=bind,src={note},dst=/note.txt,options=rbind:ro",
    ], "t1", "sh", "-c", script)
    assert res.returncode == 0, explain(res)
    assert res.stdout == "from the host\na single file\n", explain(res)
    assert (rw / "out").read_text() == "from-guest\n"
    assert not (ro / "denied").exists()


def test_missing_bind_source_is_named(kata: Kata, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    res = run_rm_args(kata.cd, KATA, ["--mount", f"type=bind,src={missing},dst=/x,options=rbind"],
                      "t1", "true")
    assert res.returncode != 0, explain(res)
    assert str(missing) in res.stderr, explain(res)


def test_volume_submounts_are_read_only_and_survive_the_container(
    kata: Kata, tmp_path: Path
) -> None:
    from hostos import syscalls
    from sandbox import storage
    from tests.harness.scenarios import detached

    source = tmp_path / "vol"
    (source / "sub").mkdir(parents=True)
    syscalls.mount("none", str(source / "sub"), "tmpfs", 0, "size=1m")
    try:
        (source / "sub" / "hello").write_text("on a host submount\n")
        script = ("cat /v/sub/hello; if echo x > /v/sub/denied 2>/dev/null; "
                  "then echo SUB-WRITABLE; fi")
        res = run_rm_args(kata.cd, KATA, ["--mount", f"type=bind,src={source},dst=/v,"
                                          "options=rbind:ro"], "t1", "sh", "-c", script)
        assert res.returncode == 0, explain(res)
        assert res.stdout == "on a host submount\n", explain(res)
        assert not (source / "sub" / "denied").exists()
        # The container is gone: the host's own submount is still there, still writable.
        assert storage.is_mountpoint(source / "sub")
        (source / "sub" / "after").write_text("ok")
        # While a sandbox runs, none of its mounts shows in the host's mount table.
        with detached(kata.cd, KATA, "t2", "sleep", "300"):
            ours = [p for p in storage.mount_points() if str(kata.state_dir) in p]
            assert ours == [], ours
    finally:
        storage.unmount_tree(source)


def test_host_side_changes_reach_a_running_container(kata: Kata, tmp_path: Path) -> None:
    """The shipped cache mode keeps file pages in the guest across opens (execs stay fast)
    but re-checks names and attributes after a second: a file the host rewrites in place,
    replaces by a rename, or adds is seen by the running container. Under plain "always"
    (a day's timeout) none of them would be."""
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_text("aaaa\n")
    cid = "vchange"
    res = kata.cd.ctr("run", "-d", "--runtime", KATA, "--mount",
                      f"type=bind,src={vol},dst=/vol,options=rbind:rw", IMAGE_REF, cid,
                      "sleep", "300", timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)
    execs = iter(range(1000))

    def read(name: str) -> str:
        done = kata.cd.ctr("task", "exec", "--exec-id", f"r{next(execs)}", cid, "sh", "-c",
                           f"cat /vol/{name} 2>/dev/null || echo missing", timeout=60)
        assert done.returncode == 0, explain(done)
        return done.stdout

    def seen(name: str, text: str) -> bool:
        deadline = time.monotonic() + CHANGE_SEEN_WITHIN
        while time.monotonic() < deadline:
            if read(name) == text:
                return True
            time.sleep(0.2)
        return False

    try:
        assert wait_task_status(kata.cd, cid, ["RUNNING"], timeout=30) == "RUNNING"
        assert read("f") == "aaaa\n" and read("f") == "aaaa\n"  # now in the guest's cache
        with open(vol / "f", "r+") as f:  # same size, in place
            f.write("bbbb\n")
        assert seen("f", "bbbb\n"), read("f")
        (vol / "f.new").write_text("replaced by a rename\n")
        (vol / "f.new").rename(vol / "f")
        assert seen("f", "replaced by a rename\n"), read("f")
        assert read("g") == "missing\n"
        (vol / "g").write_text("added\n")
        assert seen("g", "added\n"), read("g")
    finally:
        remove(kata.cd, cid)
