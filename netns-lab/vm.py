"""Run one command inside a qemu guest whose kernel has IPVS (Debian's stock kernel), the host's
own filesystem as the guest's root: `./bootstrap vm -- CMD [ARGS...]`.

This machine's kernel has no IPVS and loads no modules, so the IPVS backend is exercised in a guest
(shared/PLATFORM.md, "IPVS"). The guest sees the host's `/` read-only over virtio-9p with a tmpfs
overlay on top (it can write anywhere; everything it writes is thrown away), so the checkout, the
venv and every installed tool are at the same paths. A second, writable 9p share carries the command
in and its output and exit status out. Under software emulation (KVM cannot run a stock kernel here)
everything runs 15-25x slower than on the host: start few Python processes in the guest.

Boot files, built once per kernel and init script (idempotent), under BOOT_DIR:
  vmlinux-<release>       the uncompressed kernel (PVH boot skips seconds of decompression under TCG)
  initramfs-<hash>.cpio   busybox, the modules that mount the root (virtio, 9p, overlay) and /init
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import lzma
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BOOT_DIR = Path("/var/cache/netagent-vm")
BUSYBOX = "/bin/busybox"  # busybox-static's: the initramfs has no libc
QBOOT = "/usr/share/qemu/qboot.rom"
EARLY_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")  # with their dependencies
GUEST_MODULES = (  # loaded before the command; anything else autoloads through the overlay's modprobe
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_sh", "ip_vs_mh", "nf_conntrack", "nf_nat",
    "veth", "dummy", "bridge", "br_netfilter", "vxlan", "ip_set", "ip_set_hash_ip", "ip_set_hash_ipport",
    "ip_set_hash_ipportip", "ip_set_hash_ipportnet", "ip_set_hash_net", "ip_set_bitmap_port", "xt_set",
    "xt_ipvs", "xt_comment", "xt_mark", "xt_conntrack", "xt_addrtype", "xt_MASQUERADE", "xt_nat",
    "nf_tables", "nft_ct", "nft_nat", "nft_masq", "nft_numgen", "nft_fib_inet", "nft_reject_inet",
)
PASSED_ENV = ("TERM", "LANG", "NETAGENT_", "PYTEST_")  # host variables (or prefixes) the command keeps
SHARE_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"

INIT = f"""#!/bin/busybox sh
# PID 1 of the initramfs: mount the host's / read-only with a tmpfs overlay, then hand over to the
# run's own script on the writable share (netagent.share=PATH on the kernel command line).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do insmod "/modules/$module" || echo "initramfs: no $module"; done
share=$(sed -n 's/.*netagent.share=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
mkdir -p /lower /rw /newroot
mount -t 9p -o {SHARE_MOUNT_OPTIONS},cache=loose,ro root /lower || exec sh
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || exec sh
mkdir -p "/newroot$share"
mount -t 9p -o {SHARE_MOUNT_OPTIONS},cache=none share "/newroot$share" || exec sh
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /bin/sh "$share/run.sh"
"""

RUN = """#!/bin/sh
# The guest's side of one run, as PID 1 of the real root: the mounts a node has, then the command.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
share={share}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
mount -t tmpfs tmpfs /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/unified
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
hostname netagent-vm
for module in {modules}; do modprobe "$module" || echo "guest: no module $module" >&2; done
cd {cwd} && env -i {env} {argv} >"$share/stdout" 2>"$share/stderr" </dev/null
echo $? >"$share/status"
sync
echo o >/proc/sysrq-trigger
sleep 60
"""


class VmError(RuntimeError):
    """The guest could not be prepared or did not report an exit status."""


def kernel_release() -> str:
    """The newest kernel with both an image in /boot and modules (Debian's linux-image-amd64)."""
    releases = sorted(
        (Path(p).name.removeprefix("vmlinuz-") for p in glob.glob("/boot/vmlinuz-*")),
        key=lambda r: [int(x) if x.isdigit() else 0 for x in r.replace("-", ".").split(".")],
    )
    usable = [r for r in releases if os.path.isdir(f"/lib/modules/{r}/kernel")]
    if not usable:
        raise VmError("no kernel in /boot with modules: install linux-image-amd64 (./bootstrap vm does)")
    return usable[-1]


def extract_vmlinux(vmlinuz: Path, output: Path) -> None:
    """The ELF kernel inside a bzImage (Debian compresses it with xz)."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise VmError(f"{vmlinuz}: no xz-compressed kernel inside")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise VmError(f"{vmlinuz}: what is inside is not an ELF kernel")
    _write_atomically(output, elf)


def module_closure(release: str, names: Sequence[str]) -> list[str]:
    """The .ko paths (relative to /lib/modules/RELEASE) of `names` and what they need, in load order."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in Path(f"/lib/modules/{release}/modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
        by_name[Path(module).name.split(".ko")[0].replace("-", "_")] = module
    order: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        for dependency in reversed(deps.get(module, [])):  # modules.dep lists the deepest last
            visit(dependency)
        order.append(module)

    for name in names:
        if name not in by_name:
            raise VmError(f"kernel {release} has no module {name}")
        visit(by_name[name])
    return order


def write_cpio(output: Path, files: dict[str, tuple[int, bytes]]) -> None:
    """An initramfs in the kernel's "newc" cpio format: path -> (mode, content); directories have
    mode 0o040755 and no content, symlinks 0o120777 with the target as content."""
    chunks = []
    for number, (path, (mode, content)) in enumerate(sorted(files.items()), start=1):
        chunks.append(_cpio_entry(path, mode, content, number))
    chunks.append(_cpio_entry("TRAILER!!!", 0, b"", 0))
    _write_atomically(output, b"".join(chunks))


def _cpio_entry(path: str, mode: int, content: bytes, inode: int) -> bytes:
    name = path.encode() + b"\0"
    fields = (inode, mode, 0, 0, 1, 0, len(content), 0, 0, 0, 0, len(name), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    return _pad4(header + name) + _pad4(content)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def boot_files(release: str | None = None) -> tuple[Path, Path]:
    """(vmlinux, initramfs) for the guest, built only when missing or out of date."""
    release = release or kernel_release()
    vmlinux = BOOT_DIR / f"vmlinux-{release}"
    if not vmlinux.exists():
        extract_vmlinux(Path(f"/boot/vmlinuz-{release}"), vmlinux)
    modules = module_closure(release, EARLY_MODULES)
    version = hashlib.sha256("\n".join([release, INIT, *modules]).encode()).hexdigest()[:12]
    initramfs = BOOT_DIR / f"initramfs-{version}.cpio"
    if not initramfs.exists():
        files: dict[str, tuple[int, bytes]] = {
            name: (0o040755, b"") for name in ("bin", "dev", "proc", "sys", "modules")
        }
        files["bin/busybox"] = (0o100755, Path(BUSYBOX).read_bytes())
        files["init"] = (0o100755, INIT.encode())
        files["modules.order"] = (0o100644, "\n".join(Path(m).name for m in modules).encode() + b"\n")
        for module in modules:
            content = Path(f"/lib/modules/{release}/{module}").read_bytes()
            files[f"modules/{Path(module).name}"] = (0o100644, content)
        write_cpio(initramfs, files)
    return vmlinux, initramfs


def run(argv: Sequence[str], *, cwd: str | None = None, timeout: float = 3600.0, memory_mb: int = 2048,
        keep_console: bool = False) -> int:
    """Run argv as root in the guest (from cwd, default: here) and relay its stdout and stderr as they
    are written; its exit status, or VmError if the guest never reported one."""
    if not argv:
        raise VmError("no command to run in the guest")
    vmlinux, initramfs = boot_files()
    with tempfile.TemporaryDirectory(prefix="netagent-vm-") as share_dir:
        share = Path(share_dir)
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in _guest_env().items())
        (share / "run.sh").write_text(RUN.format(
            share=shlex.quote(share_dir), cwd=shlex.quote(cwd or os.getcwd()), env=env,
            argv=" ".join(shlex.quote(a) for a in argv), modules=" ".join(GUEST_MODULES),
        ))
        for name in ("stdout", "stderr"):
            (share / name).touch()
        console = share / "console.log"
        qemu = _qemu_argv(vmlinux, initramfs, share_dir, console, memory_mb)
        with subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) as proc:
            _relay_until_exit(proc, share, timeout)
            qemu_errors = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        status = (share / "status").read_text().strip() if (share / "status").exists() else ""
        if keep_console or not status:
            sys.stderr.write(console.read_text(errors="replace")[-4000:] if console.exists() else "")
        if not status.isdigit():
            raise VmError(f"the guest reported no exit status (qemu exit {proc.returncode}): "
                          f"{qemu_errors.strip()[-2000:] or 'see the console output above'}")
        return int(status)


def _qemu_argv(vmlinux: Path, initramfs: Path, share: str, console: Path, memory_mb: int) -> list[str]:
    root = "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap"
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16",
        "-smp", "1", "-m", str(memory_mb), "-nodefaults", "-display", "none", "-no-reboot",
        "-bios", QBOOT, "-kernel", str(vmlinux), "-initrd", str(initramfs),
        "-append", f"console=ttyS0 quiet panic=-1 mitigations=off netagent.share={share}",
        "-serial", f"file:{console}",
        "-fsdev", root, "-device", "virtio-9p-pci,fsdev=root,mount_tag=root",
        "-fsdev", f"local,id=share,path={share},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=share,mount_tag=share",
    ]


def _guest_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root"}
    env.update({k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)})
    return env


def _relay_until_exit(proc: subprocess.Popen, share: Path, timeout: float) -> None:
    """Copy what the guest appends to its stdout/stderr files to ours until qemu exits."""
    deadline = time.monotonic() + timeout
    with open(share / "stdout", "rb") as out, open(share / "stderr", "rb") as err:
        while True:
            exited = proc.poll() is not None
            for source, sink in ((out, sys.stdout.buffer), (err, sys.stderr.buffer)):
                data = source.read()
                if data:
                    sink.write(data)
                    sink.flush()
            if exited:
                return
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise VmError(f"the guest did not finish within {timeout:.0f}s")
            time.sleep(0.2)


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="netagent-vm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the guest is killed")
    parser.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    parser.add_argument("--console", action="store_true", help="print the guest's console afterwards")
    parser.add_argument("--build-only", action="store_true", help="only build the boot files")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    options = parser.parse_args(args)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    try:
        if options.build_only:
            print(*boot_files())
            return
        if shutil.which("qemu-system-x86_64") is None:
            raise VmError("qemu-system-x86_64 is not installed (./bootstrap vm installs it)")
        status = run(command, timeout=options.timeout, memory_mb=options.memory, keep_console=options.console)
        sys.exit(status)
    except VmError as err:
        sys.exit(f"netagent-vm: {err}")


if __name__ == "__main__":
    main()
