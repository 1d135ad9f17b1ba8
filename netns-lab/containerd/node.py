"""A throwaway containerd confined to one lab node, so `ctr run --cni` can drive a CNI plugin for real.

Confinement, and why each piece is needed:
- Network: containerd, its shims and every `ctr` call run in the node's netns, so the CNI plugins that
  `ctr run --cni` executes build their bridge and veths there, never in the host's root namespace.
- Files: ctr 1.6 has no flag for its CNI directories; it always reads /etc/cni/net.d, executes from
  /opt/cni/bin and caches results in /var/lib/cni. All of them run in a private mount namespace
  where temp dirs are mounted over those paths (a missing path is created inside an overlay of its
  parent), so the host's real directories are never touched. The shims insist on /run/containerd,
  so /run is a private tmpfs there, showing the host's /run entries again (see _private_run).
- Kernel view: sysfs is remounted from inside the node, so it lists the node's interfaces.
- Lifetime: the mount namespace is held by a `sleep` we start; it, containerd and the shims are the
  only members, so once they are gone every mount made for this node disappears with it. Containers
  go into one cgroup parent per node, removed at the end. All state lives in one temp dir.

A pod is a foreground `ctr run --rm --cni` process, as a user would run it: ctr calls CNI ADD before
starting the task and CNI DEL when the task exits, then deletes the container. (A detached ctr run
never calls DEL, so it could not show that removing a container releases its address.)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from subprocess import CompletedProcess

from nodekit import netns

CNI_CONF_PATH = "/etc/cni/net.d"  # where ctr 1.6 reads CNI network configs (fixed)
CNI_BIN_PATH = "/opt/cni/bin"  # where ctr 1.6 looks for plugin executables (fixed)
CNI_CACHE_PATH = "/var/lib/cni"  # where libcni caches ADD results for DEL (fixed)
CGROUP_ROOT = "/sys/fs/cgroup"
# Plugins a containerd used only through ctr does not need; disabling them keeps it from probing the
# host (CRI would watch /etc/cni, the others look for filesystems or tracing endpoints).
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class ContainerdError(RuntimeError):
    """containerd or ctr did not do what was asked; the message carries their own words."""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; the machine is shared and slow, so callers pass generous timeouts."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ContainerdError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit; always reaps it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _tail(path: str, lines: int = 20) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
    return ""


@dataclass
class Pod:
    """A container started by `ctr run --rm --cni`, alive as long as its ctr process."""

    node: ContainerdNode
    name: str
    process: subprocess.Popen
    log_path: str
    pid: int = 0  # the task's init process, valid once running

    @property
    def netns_path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    def ipv4_addresses(self, ifname: str = "eth0") -> list[str]:
        """Addresses as the container's own network namespace reports them ("ip/prefix")."""
        listing = subprocess.run(
            ["nsenter", f"--net={self.netns_path}", "ip", "-j", "-4", "addr", "show", "dev", ifname],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(listing) for a in link["addr_info"]]

    def exec(self, argv: Sequence[str], timeout: float = 60.0) -> CompletedProcess:
        """Run a command inside the container (`ctr task exec`); never raises on its exit code."""
        return self.node.ctr(
            ["task", "exec", "--exec-id", f"x{secrets.token_hex(4)}", self.name, *argv],
            check=False,
            timeout=timeout,
        )

    def log(self) -> str:
        return _tail(self.log_path, 200)


@dataclass
class ContainerdNode:
    """containerd + ctr confined to netns `node_netns`; use as a context manager (cleans up on failure)."""

    node_netns: str
    snapshotter: str = "overlayfs"
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="nactrd-"))
    holder: subprocess.Popen | None = None
    daemon: subprocess.Popen | None = None
    pods: dict[str, Pod] = field(default_factory=dict)

    # Host-side directories that appear inside the node's mount namespace at the fixed CNI paths.
    @property
    def conf_dir(self) -> str:
        return self.path("cni/net.d")

    @property
    def bin_dir(self) -> str:
        return self.path("cni/bin")

    @property
    def cache_dir(self) -> str:
        return self.path("cni/cache")

    @property
    def socket(self) -> str:
        return self.path("containerd.sock")

    @property
    def cgroup_parent(self) -> str:
        return f"netagent-{os.path.basename(self.workdir)}"

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def __enter__(self) -> ContainerdNode:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        for directory in (self.conf_dir, self.bin_dir, self.cache_dir, self.path("mnt", "cgroup"),
                          self.path("mnt", "run")):  # fmt: skip
            os.makedirs(directory, exist_ok=True)
        self._start_holder()
        self._make_private_mounts()
        self._write_config()
        with open(self.path("containerd.log"), "wb") as log:
            self.daemon = subprocess.Popen(
                self._inside(["containerd", "--config", self.path("config.toml")]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_until(self._daemon_answers, 60, "containerd to answer on its socket")

    def _inside(self, argv: Sequence[str]) -> list[str]:
        """argv that runs inside the node: its netns and our private mount namespace."""
        assert self.holder is not None, "start() first"
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", *argv]

    def _start_holder(self) -> None:
        """Start the process that owns the private mount namespace, and prove it is really separate.

        Everything later mounts and unmounts through `nsenter -t <holder>`. Acting too early would hit
        the host: before unshare, the host's own mount namespace (tmpfs over the host's /run); before
        the propagation change, mounts still shared with the host (an unmount under /run/netns would
        propagate and delete every named netns). Once the holder has exec'd `sleep`, unshare has done
        both, and its mount table must show no shared mount at all.
        """
        self.holder = subprocess.Popen(
            ["nsenter", f"--net={netns.path(self.node_netns)}", "unshare", "--mount", "--propagation",
             "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        pid, node_inode = self.holder.pid, os.stat(netns.path(self.node_netns)).st_ino

        def confined() -> bool:
            if self.holder.poll() is not None:
                raise ContainerdError("could not create the node's private mount namespace (unshare failed)")
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as comm:
                return (
                    comm.read().strip() == "sleep"
                    and os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
                    and os.stat(f"/proc/{pid}/ns/net").st_ino == node_inode
                )
            return False

        wait_until(confined, 30, "the mount-namespace holder to enter its namespaces")
        with open(f"/proc/{pid}/mountinfo") as f:
            if any(" shared:" in line.split(" - ")[0] for line in f):
                raise ContainerdError("the node's mount namespace still shares mounts with the host")

    def _set_up(self, *argv: str) -> None:
        """One step of building the node's mount namespace (mount, umount, mkdir), run inside it."""
        result = subprocess.run(self._inside(argv), capture_output=True, text=True)
        if result.returncode != 0:
            raise ContainerdError(f"{' '.join(argv)}: {result.stderr.strip()}")

    def _mount(self, *args: str) -> None:
        # --no-mtab: util-linux would otherwise record the mount in /run/mount/utab, on the host's /run
        self._set_up("mount", "--no-mtab", *args)

    def _make_private_mounts(self) -> None:
        self._drop_netns_copies()
        # A sysfs mounted from inside the node shows the node's interfaces, not the host's; the cgroup
        # hierarchies runc needs are carried over on top of it.
        stash = self.path("mnt", "cgroup")
        self._mount("--rbind", CGROUP_ROOT, stash)
        self._set_up("umount", "--no-mtab", "--recursive", "--lazy", "/sys")
        self._mount("-t", "sysfs", "sysfs", "/sys")
        self._mount("--move", stash, CGROUP_ROOT)
        self._private_run()
        for target, source in ((CNI_CONF_PATH, self.conf_dir), (CNI_BIN_PATH, self.bin_dir),
                               (CNI_CACHE_PATH, self.cache_dir)):  # fmt: skip
            self._shadow(target, source)

    def _private_run(self) -> None:
        """A private /run (the shims insist on /run/containerd/s) that still shows the host's /run.

        Each top-level entry of the host's /run at this moment is carried over; directories are bound,
        so what appears inside them later is seen too (an agent's socket and node state under
        /run/netagent, say). Left out: /run/netns (see _drop_netns_copies) and /run/containerd. A new
        top-level entry of the host's /run made after start is not seen: create it first.
        """
        stash = self.path("mnt", "run")
        self._mount("--rbind", "/run", stash)
        self._mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
        in_node = f"/proc/{self.holder.pid}/root"
        for entry in os.scandir(in_node + stash):
            if entry.name in (os.path.basename(netns.NETNS_DIR), "containerd"):
                continue
            target = os.path.join("/run", entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), in_node + target)
            elif entry.is_dir():
                os.mkdir(in_node + target)
                self._mount("--rbind", os.path.join(stash, entry.name), target)
            else:
                open(in_node + target, "w").close()
                self._mount("--bind", os.path.join(stash, entry.name), target)
        self._set_up("umount", "--no-mtab", "--recursive", "--lazy", stash)

    def _drop_netns_copies(self) -> None:
        """Unmount our copies of the named netns mounts under /run/netns.

        A new mount namespace copies every mount, including each `ip netns` handle on the machine; a
        copy keeps its netns alive after its owner deletes it, for as long as this node lives.
        """
        with open(f"/proc/{self.holder.pid}/mountinfo") as f:
            mount_points = [line.split()[4] for line in f]
        for target in sorted((m for m in mount_points if m.startswith(netns.NETNS_DIR)), reverse=True):
            subprocess.run(self._inside(["umount", "--no-mtab", "--lazy", target]), capture_output=True)

    def _shadow(self, target: str, source: str) -> None:
        """Make `source` appear at `target` inside the node, creating `target` only inside an overlay."""
        in_node = f"/proc/{self.holder.pid}/root"
        anchor = target
        while not os.path.isdir(in_node + anchor):
            anchor = os.path.dirname(anchor)
        if anchor != target:
            layer = self.path("overlay", anchor.strip("/").replace("/", "_"))
            os.makedirs(os.path.join(layer, "upper"), exist_ok=True)
            os.makedirs(os.path.join(layer, "work"), exist_ok=True)
            options = f"lowerdir={anchor},upperdir={layer}/upper,workdir={layer}/work"
            self._mount("-t", "overlay", "overlay", "-o", options, anchor)
            self._set_up("mkdir", "-p", target)
        self._mount("--bind", source, target)

    def _write_config(self) -> None:
        quoted = json.dumps  # a JSON string is a valid TOML basic string
        config = f"""version = 2
root = {quoted(self.path("root"))}
state = {quoted(self.path("state"))}
disabled_plugins = {quoted(list(DISABLED_PLUGINS))}

[grpc]
  address = {quoted(self.socket)}

[ttrpc]
  address = {quoted(self.socket + ".ttrpc")}

[plugins."io.containerd.internal.v1.opt"]
  path = {quoted(self.path("opt"))}
"""
        with open(self.path("config.toml"), "w") as f:
            f.write(config)

    def _daemon_answers(self) -> bool:
        if self.daemon.poll() is not None:
            raise ContainerdError(f"containerd exited:\n{_tail(self.path('containerd.log'))}")
        return self.ctr(["version"], check=False, timeout=30).returncode == 0

    def ctr(self, args: Sequence[str], check: bool = True, timeout: float = 120.0) -> CompletedProcess:
        """Run `ctr` against this node's containerd, inside the node."""
        result = subprocess.run(
            self._inside(["ctr", "--address", self.socket, *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)}: {(result.stderr or result.stdout).strip()}")
        return result

    def import_image(self, tarball: str) -> None:
        self.ctr(["images", "import", "--snapshotter", self.snapshotter, tarball])

    def tasks(self) -> dict[str, tuple[int, str]]:
        """Task id -> (pid, status) as containerd reports them."""
        rows = self.ctr(["task", "ls"]).stdout.splitlines()[1:]
        return {cols[0]: (int(cols[1]), cols[2]) for cols in (row.split() for row in rows) if len(cols) == 3}

    def _run_argv(self, image: str, name: str, argv: Sequence[str], cni: bool) -> list[str]:
        network = ["--cni"] if cni else []
        return self._inside(["ctr", "--address", self.socket, "run", "--rm", *network,
                             "--snapshotter", self.snapshotter, "--cgroup", f"/{self.cgroup_parent}/{name}",
                             image, name, *argv])  # fmt: skip

    def run_pod(self, image: str, name: str, argv: Sequence[str], timeout: float = 120.0) -> Pod:
        """`ctr run --rm --cni` in the foreground; returns once the task runs (CNI ADD has succeeded)."""
        log_path = self.path(f"pod-{name}.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                self._run_argv(image, name, argv, cni=True), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        pod = Pod(node=self, name=name, process=process, log_path=log_path)
        self.pods[name] = pod

        def running() -> bool:
            if process.poll() is not None:
                self._forget(pod.name)
                raise ContainerdError(f"ctr run {name} exited with {process.returncode}:\n{pod.log()}")
            pid, status = self.tasks().get(name, (0, ""))
            pod.pid = pid
            return status == "RUNNING"

        wait_until(running, timeout, f"container {name} to run")
        return pod

    def run_once(self, image: str, name: str, argv: Sequence[str], cni: bool = True) -> CompletedProcess:
        """One whole container lifecycle, `ctr run --rm [--cni]`: create, ADD, start, exit, DEL, delete."""
        result = subprocess.run(self._run_argv(image, name, argv, cni), capture_output=True, text=True)
        if result.returncode != 0:
            self._forget(name)
            raise ContainerdError(f"ctr run {name} exited with {result.returncode}: {result.stderr.strip()}")
        return result

    def remove_pod(self, pod: Pod, timeout: float = 120.0) -> None:
        """Kill the task; the foreground ctr then calls CNI DEL and deletes the container."""
        self.ctr(["task", "kill", "--signal", "SIGKILL", pod.name], check=False)
        try:
            pod.process.wait(timeout)
        except subprocess.TimeoutExpired as error:
            raise ContainerdError(f"ctr run {pod.name} did not finish after its task was killed") from error
        finally:
            self._forget(pod.name)
        if "network review" in pod.log():  # ctr's wording when CNI DEL fails
            raise ContainerdError(f"CNI DEL failed for {pod.name}:\n{pod.log()}")

    def _forget(self, name: str) -> None:
        """Delete whatever its `ctr run` left of a pod (nothing, normally).

        When CNI ADD fails, ctr exits leaving the task it created but never started (containerd
        refuses to delete a created task without --force) and therefore the container too.
        """
        self.ctr(["task", "delete", "--force", name], check=False)
        self.ctr(["container", "delete", name], check=False)
        self.pods.pop(name, None)

    def close(self) -> None:
        """Stop everything this node started and remove its state; safe after a partial start."""
        for pod in list(self.pods.values()):
            with contextlib.suppress(ContainerdError, subprocess.TimeoutExpired):
                self.remove_pod(pod, timeout=30)
            _stop(pod.process)
        if self.daemon is not None:
            _stop(self.daemon)
        for pid in self._leftover_pids():
            _kill_pid(pid)
        if self.holder is not None:
            _stop(self.holder)
        self._remove_cgroups()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _leftover_pids(self) -> list[int]:
        """Shims serving our socket and processes in our cgroups: they outlive containerd otherwise."""
        pids: set[int] = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                    if self.socket.encode() in f.read().split(b"\0"):
                        pids.add(int(entry))
        for directory in self._cgroup_dirs():
            for root, _dirs, files in os.walk(directory):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError), open(os.path.join(root, "cgroup.procs")) as f:
                        pids.update(int(line) for line in f if line.strip())
        return sorted(pids)

    def _cgroup_dirs(self) -> list[str]:
        """Our cgroup parent in every mounted hierarchy (v1 controllers and the unified one)."""
        candidates = [os.path.join(CGROUP_ROOT, self.cgroup_parent)]
        with contextlib.suppress(OSError):
            candidates += [os.path.join(CGROUP_ROOT, h, self.cgroup_parent) for h in os.listdir(CGROUP_ROOT)]
        return [c for c in candidates if os.path.isdir(c)]

    def _remove_cgroups(self) -> None:
        """rmdir bottom-up; a cgroup is busy until the killed processes in it are reaped, so retry."""

        def removed() -> bool:
            for directory in self._cgroup_dirs():
                for root, _dirs, _files in os.walk(directory, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(root)
            return not self._cgroup_dirs()

        with contextlib.suppress(ContainerdError):
            wait_until(removed, 10, "the node's cgroups to empty")
