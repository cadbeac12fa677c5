"""A real multi-node Ray cluster on one machine, for the cluster-path tests.

Raylets that share an IP look like one node to Ray Train (it ranks nodes by IP), so each node gets its own
network namespace and address on a bridge: documentation addresses (198.51.100.0/24) that exist only inside
these namespaces, never on the host. Each node also gets a private ``/tmp`` (a bind mount inside the node's
mount namespace), so node-local disks are real: what one node writes under /tmp the others cannot see.
Services a cluster has (PostgreSQL, an MLflow server) listen on the head's address, as loopback serves one
machine. Everything is torn down by namespace: every process in a node's namespace is killed, never by name.

Needs root and iproute2 (``ip netns``); ``available()`` says why not where that is impossible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

SUBNET = "198.51.100"


def available() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"segevo-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Node:
    def __init__(self, cluster: NetnsCluster, index: int):
        self.index = index
        self.name = f"{cluster.tag}n{index}"
        self.address = f"{SUBNET}.{index + 1}"
        self.tmp = cluster.base / f"node{index}-tmp"
        self.cluster = cluster

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this node: its network namespace and its own /tmp."""
        script = 'mount --bind "$0" /tmp && exec "$@"'
        return ["ip", "netns", "exec", self.name, "sh", "-c", script, str(self.tmp), *argv]

    def run(self, argv: Sequence[str], timeout: float = 600, check: bool = False,
            env: dict[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, check=check,
                              env={**self.cluster.env, **(env or {})}, cwd=cwd)

    def popen(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(self.command(argv), stdout=out, stderr=subprocess.STDOUT,
                                    env={**self.cluster.env, **(env or {})}, cwd=cwd, start_new_session=True)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pid_of(self, needle: str) -> int | None:
        """The process in this node whose command line holds ``needle`` (e.g. the raylet)."""
        for pid in self.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline:
                return pid
        return None


class NetnsCluster:
    """``nodes`` namespaces on one bridge; node 0 is the head. Use as a context manager."""

    def __init__(self, base: Path, nodes: int, env: dict[str, str]):
        self.tag = f"sv{uuid.uuid4().hex[:5]}"
        self.base = base
        self.env = env
        self.switch = f"{self.tag}sw"
        self.nodes = [Node(self, i) for i in range(nodes)]

    @property
    def head(self) -> Node:
        return self.nodes[0]

    def __enter__(self) -> NetnsCluster:
        try:
            self._network()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _network(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for node in self.nodes:
            node.tmp.mkdir(parents=True, exist_ok=True)
            _ip("netns", "add", node.name)
            port = f"{self.tag}p{node.index}"
            _ip("link", "add", port, "type", "veth", "peer", "name", f"{self.tag}e{node.index}")
            _ip("link", "set", port, "netns", self.switch)
            _ip("link", "set", f"{self.tag}e{node.index}", "netns", node.name)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", node.name, "link", "set", f"{self.tag}e{node.index}", "name", "eth0")
            _ip("-n", node.name, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _ip("-n", node.name, "link", "set", "eth0", "up")
            _ip("-n", node.name, "link", "set", "lo", "up")

    def wait_port(self, node: Node, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        probe = ["python3", "-c", f"import socket; socket.create_connection(('{node.address}', {port}), 1)"]
        while time.monotonic() < deadline:
            if self.head.run(probe, timeout=10).returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{node.address}:{port} did not open within {timeout:.0f} s")

    def close(self) -> None:
        for node in self.nodes:
            node.kill_all()
        for node in self.nodes:
            subprocess.run(["ip", "netns", "del", node.name], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
