"""What ``kata-runtime version`` and ``containerd-shim-kata-v2 -v`` print: one formatter.

The version and commit come from `common.buildinfo`; the guest image is described by the
``MANIFEST`` that ``make guest`` writes beside ``vmlinuz``/``initrd.img`` (build/out/) and
``make install`` beside the installed kernel and initrd (/usr/share/kata-containers/): it is
looked for in the directory of the configured initrd, then of the kernel (each as
configured, then with links resolved). The first lines keep the shape of containerd's own
shims (``<name>:``, ``  Version:  ``, ``  Revision: ``, then the toolchain), so a tool that
reads ``containerd-shim-runc-v2 -v`` reads ours.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any

from common.buildinfo import build_info
from sandbox.config import load_config
from sandbox.errors import SandboxError

MANIFEST = "MANIFEST"
MAX_MANIFEST = 1 << 20  # bytes; ours is a few KiB
OUTPUTS = ("vmlinux", "vmlinuz", "initrd.img", "rootfs.img", "rootfs-loader.img")


def find_manifest(kernel: str, initrd: str) -> Path | None:
    """The MANIFEST beside the configured initrd or kernel, if any."""
    dirs: list[Path] = []
    for image in (initrd, kernel):
        if image:
            dirs += [Path(image).parent, Path(os.path.realpath(image)).parent]
    return next((d / MANIFEST for d in dict.fromkeys(dirs) if (d / MANIFEST).is_file()), None)


def summarize_manifest(text: str) -> dict[str, str]:
    """The facts of a MANIFEST worth a version line: kernel package, agent sources hash,
    and the outputs' sizes and hashes (keys absent when the manifest lacks them)."""
    facts: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        words = line.split()
        if line.startswith("["):
            section = line[1:line.find("]")]
        elif section == "debian packages" and words and words[0].startswith("linux-image"):
            facts.setdefault("kernel_package", " ".join(words[:2]))
        elif section == "agent" and len(words) >= 2 and words[0] in ("sources_sha256", "python"):
            facts[f"agent_{words[0]}"] = " ".join(words[1:])
        elif section == "outputs" and len(words) == 3 and words[0] in OUTPUTS:
            facts[words[0]] = f"sha256 {words[2]} ({words[1]} bytes)"
    return facts


def guest_image(kernel: str, initrd: str) -> dict[str, Any]:
    """``{"manifest": path, "sha256": ..., "facts": {...}}``, or ``{"problem": why}``."""
    path = find_manifest(kernel, initrd)
    if path is None:
        return {"problem": f"no {MANIFEST} beside the configured initrd ({initrd or '-'}) "
                           f"or kernel ({kernel})"}  # fmt: skip
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST)
    except OSError as e:
        return {"problem": f"{path}: {e.strerror or e}"}
    return {"manifest": str(path), "sha256": hashlib.sha256(data).hexdigest(),
            "facts": summarize_manifest(data.decode("utf-8", "replace"))}


def version_doc(config_path: str | None = None, variant: str = "") -> dict[str, Any]:
    """Version, commit, Python, and the configured guest image, as plain JSON values."""
    build = build_info()
    doc: dict[str, Any] = {"version": build.version, "commit": build.commit,
                           "python": platform.python_version()}
    try:
        config = load_config(config_path, variant)
    except SandboxError as e:
        doc["guest_image"] = {"problem": f"no configuration ({e})"}
        return doc
    hv = config.hypervisor
    doc["config"] = str(config.path)
    doc["guest_image"] = {"kernel": hv.kernel, "initrd": hv.initrd, "image": hv.image,
                          **guest_image(hv.kernel, hv.initrd)}
    return doc


def format_version(program: str, doc: dict[str, Any]) -> str:
    """The text both commands print for `version_doc`'s result."""
    lines = [f"{program}:", f"  Version:  {doc['version']}", f"  Revision: {doc['commit']}",
             f"  Python version: {doc['python']}"]
    image = doc["guest_image"]
    if "manifest" in image:
        lines.append(f"  Guest image: {image['manifest']} (sha256 {image['sha256']})")
        lines += [f"    {key.replace('_', ' ')}: {value}" for key, value in image["facts"].items()]
    else:
        lines.append(f"  Guest image: unknown: {image['problem']}")
    return "\n".join(lines) + "\n\n"


def version_text(program: str, config_path: str | None = None, variant: str = "") -> str:
    """`format_version` of this build and configuration."""
    return format_version(program, version_doc(config_path, variant))
