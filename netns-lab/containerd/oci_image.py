"""Build a minimal OCI image (busybox) as an image-layout tarball, locally, with no registry.

The machine has no registry access, yet a real runtime (containerd) needs an image to run a pod.
Debian's busybox-static is a single static binary, so one layer holding it plus a symlink per applet
is a complete userland (sh, ip, ping, nc, httpd, sleep...). The tarball follows the OCI image-layout
spec (oci-layout, index.json, blobs/sha256/...) so `ctr images import` accepts it as is.

Output is deterministic (fixed mtimes and owners), so the same busybox always gives the same digest.

    python -m netns_lab.containerd.oci_image OUT.tar [--ref NAME:TAG]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass

DEFAULT_BUSYBOX = "/bin/busybox"
DEFAULT_REF = "localhost/netagent/busybox:latest"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
ROOTFS_DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "var", "run")


@dataclass(frozen=True)
class Blob:
    """One content-addressed blob of the image layout."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    manifest_digest: str
    path: str


def busybox_applets(busybox: str) -> list[str]:
    """The applet names this busybox provides (each becomes a /bin symlink)."""
    listing = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({name for name in listing.split() if name and "/" not in name and name != "busybox"})


def _add_entry(archive: tarfile.TarFile, info: tarfile.TarInfo, data: bytes | None = None) -> None:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    archive.addfile(info, io.BytesIO(data) if data is not None else None)


def rootfs_layer(busybox: str) -> bytes:
    """An uncompressed layer tar: the FHS skeleton, /bin/busybox and one symlink per applet."""
    with open(busybox, "rb") as f:
        binary = f.read()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for directory in ROOTFS_DIRS:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            _add_entry(archive, info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(binary), 0o755
        _add_entry(archive, info, binary)
        for applet in busybox_applets(busybox):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
            _add_entry(archive, link)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text), 0o644
            _add_entry(archive, info, text.encode())
    return buffer.getvalue()


def _json_blob(media_type: str, document: dict[str, object]) -> Blob:
    return Blob(media_type, json.dumps(document, sort_keys=True, separators=(",", ":")).encode())


def build(path: str, ref: str = DEFAULT_REF, busybox: str = DEFAULT_BUSYBOX) -> BuiltImage:
    """Write an OCI image-layout tarball for busybox to `path`; `ref` is the name it imports as."""
    if ":" not in ref.rsplit("/", 1)[-1]:
        raise ValueError(f"image reference {ref!r} needs a tag (name:tag)")
    layer = Blob(LAYER_MEDIA_TYPE, rootfs_layer(busybox))
    config = _json_blob(
        CONFIG_MEDIA_TYPE,
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        },
    )
    manifest = _json_blob(
        MANIFEST_MEDIA_TYPE,
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(),
            "layers": [layer.descriptor()],
        },
    )
    tag = ref.rsplit(":", 1)[1]
    index = _json_blob(
        INDEX_MEDIA_TYPE,
        {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [
                manifest.descriptor(
                    platform={"architecture": "amd64", "os": "linux"},
                    annotations={"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
                )
            ],
        },
    )
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), "index.json": index.data}
    for blob in (layer, config, manifest):
        files[f"blobs/sha256/{blob.digest.split(':', 1)[1]}"] = blob.data
    tmp = f"{path}.partial"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            _add_entry(archive, info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            _add_entry(archive, info, data)
    os.replace(tmp, path)
    return BuiltImage(ref=ref, manifest_digest=manifest.digest, path=path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a busybox OCI image tarball (no registry needed).")
    parser.add_argument("output", help="tarball to write")
    parser.add_argument("--ref", default=DEFAULT_REF, help="image name:tag it imports as")
    parser.add_argument("--busybox", default=DEFAULT_BUSYBOX, help="static busybox binary to package")
    args = parser.parse_args(argv)
    try:
        image = build(args.output, ref=args.ref, busybox=args.busybox)
    except (OSError, ValueError, subprocess.CalledProcessError) as error:
        parser.exit(1, f"oci_image: {error}\n")
    print(f"{image.ref} {image.manifest_digest} {image.path}")


if __name__ == "__main__":
    main()
