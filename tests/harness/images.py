"""Build a busybox OCI image without any registry, and import it into a containerd.

The image is a single uncompressed layer: the static /bin/busybox, one symlink per applet,
/etc/passwd, /etc/group and empty mount points. The layer tar is deterministic (sorted
entries, fixed mtimes, uid/gid 0), so the image digest is stable between runs on one host.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
IMAGE_REF = "docker.io/library/busybox:latest"
PAUSE_REF = "registry.k8s.io/pause:ktest"
PAUSE_ENTRYPOINT = ["/bin/sleep", "infinity"]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MTIME = 1_700_000_000  # fixed timestamp for every tar entry
CREATED = "2023-11-14T22:13:20Z"  # the same instant, for the image config
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
ANNOTATION_REF = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
# Applets every test may rely on, even if `busybox --list` were to omit them.
REQUIRED_APPLETS = ("sh", "cat", "echo", "uname", "sleep", "ps", "top", "ls", "env", "id",
                    "true", "false", "wc", "head", "stty", "kill", "mount")

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


def busybox_rootfs(rootfs: Path, applets: tuple[str, ...], busybox: Path = BUSYBOX) -> Path:
    """A minimal container rootfs at ``rootfs``: the static busybox and links for
    ``applets`` in /bin, and the mount points crun needs."""
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir()
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in applets:
        (rootfs / "bin" / applet).symlink_to("busybox")
    return rootfs


def applets(busybox: Path = BUSYBOX) -> list[str]:
    """The applet names the busybox binary offers, plus the ones tests need."""
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    names = set(out) | set(REQUIRED_APPLETS)
    return sorted(n for n in names if n and "/" not in n and n != "busybox")


def _add_entry(tar: tarfile.TarFile, name: str, kind: bytes, mode: int,
               data: bytes = b"", link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def layer_tar(busybox: Path = BUSYBOX) -> bytes:
    """The rootfs layer as an uncompressed, deterministic tar."""
    dirs = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o555, "root": 0o700,
            "sys": 0o555, "tmp": 0o1777, "usr": 0o755, "usr/bin": 0o755, "var": 0o755}
    files = {"bin/busybox": (busybox.read_bytes(), 0o755),
             "etc/passwd": (PASSWD.encode(), 0o644),
             "etc/group": (GROUP.encode(), 0o644)}
    links = {f"bin/{name}": "busybox" for name in applets(busybox)}
    entries: list[tuple[str, bytes, int, bytes, str]] = []
    entries += [(d, tarfile.DIRTYPE, m, b"", "") for d, m in dirs.items()]
    entries += [(f, tarfile.REGTYPE, m, data, "") for f, (data, m) in files.items()]
    entries += [(s, tarfile.SYMTYPE, 0o777, b"", t) for s, t in links.items()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, mode, data, link in sorted(entries):
            _add_entry(tar, name, kind, mode, data, link)
    return buf.getvalue()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image_blobs(layer: bytes, ref: str = IMAGE_REF,
                entrypoint: list[str] | None = None) -> tuple[list[Blob], dict[str, object]]:
    """All blobs of the image (layer, config, manifest) and the index.json content."""
    layer_blob = Blob(MEDIA_LAYER, layer)
    run: dict[str, object] = {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["sh"], "WorkingDir": "/"}
    if entrypoint:
        run = {"Env": run["Env"], "Entrypoint": entrypoint, "WorkingDir": "/"}
    config = {
        "architecture": "amd64", "os": "linux", "created": CREATED,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [layer_blob.digest]},
        "history": [{"created": CREATED, "created_by": "tests/harness/images.py"}],
    }
    config_blob = Blob(MEDIA_CONFIG, _json(config))
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                "config": config_blob.descriptor(), "layers": [layer_blob.descriptor()]}
    manifest_blob = Blob(MEDIA_MANIFEST, _json(manifest))
    entry = manifest_blob.descriptor() | {
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {ANNOTATION_REF: ref, ANNOTATION_CONTAINERD_NAME: ref},
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [entry]}
    return [layer_blob, config_blob, manifest_blob], index


def oci_archive(busybox: Path = BUSYBOX, ref: str = IMAGE_REF,
                entrypoint: list[str] | None = None) -> bytes:
    """The image as an OCI image-layout tar, ready for `ctr image import`."""
    blobs, index = image_blobs(layer_tar(busybox), ref, entrypoint)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _add_entry(tar, "blobs", tarfile.DIRTYPE, 0o755)
        _add_entry(tar, "blobs/sha256", tarfile.DIRTYPE, 0o755)
        for blob in sorted(blobs, key=lambda b: b.digest):
            name = "blobs/sha256/" + blob.digest.removeprefix("sha256:")
            _add_entry(tar, name, tarfile.REGTYPE, 0o644, blob.data)
        _add_entry(tar, "index.json", tarfile.REGTYPE, 0o644, _json(index))
        _add_entry(tar, "oci-layout", tarfile.REGTYPE, 0o644,
                   _json({"imageLayoutVersion": "1.0.0"}))
    return buf.getvalue()


def pause_image_tar(directory: Path | None = None) -> Path:
    """The pod sandbox ("pause") image CRI starts first in every pod. No registry is
    reachable, so it is the busybox layer whose entrypoint sleeps until killed (CRI stops
    a sandbox container with SIGKILL)."""
    return busybox_image_tar(directory, PAUSE_REF, PAUSE_ENTRYPOINT)


def cache_dir() -> Path:
    base = os.environ.get("KTEST_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "ktest-cache")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def busybox_image_tar(directory: Path | None = None, ref: str = IMAGE_REF,
                      entrypoint: list[str] | None = None) -> Path:
    """Build (or reuse) the busybox image archive; the file name carries a content hash."""
    data = oci_archive(BUSYBOX, ref, entrypoint)
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = (directory or cache_dir()) / f"busybox-{digest}.oci.tar"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path
