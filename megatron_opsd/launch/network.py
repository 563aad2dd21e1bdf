"""The job's network: each node's address on the fabric, and the ports every process listens on.

A node with several interfaces (Ethernet, InfiniBand, a container bridge) must use the one the
others reach it on; picking it by an address prefix (``OPSD_FABRIC_PREFIX``, e.g. ``10.``) and a
prefix that matches nothing failing at once is what keeps NCCL and gloo from hanging silently on
a wrong interface. Ports are pinned, derived from the job id, and all below the ephemeral range,
so that nothing the kernel hands out can take one first (random free ports collide at scale).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from megatron_opsd.launch.slurm import LaunchError


def fabric_interface(prefix: str | None) -> tuple[str, str]:
    """(interface, IPv4 address) of this node on the fabric: the first address that starts with
    ``prefix``; without a prefix, the address this node's host name resolves to."""
    addresses = sorted((name, a.address) for name, entries in psutil.net_if_addrs().items()
                       for a in entries if a.family == socket.AF_INET)
    if prefix:
        matches = [(name, address) for name, address in addresses if address.startswith(prefix)]
        wanted = f"an address starting with {prefix!r} (OPSD_FABRIC_PREFIX)"
    else:
        resolved = socket.gethostbyname(socket.gethostname())
        matches = [(name, address) for name, address in addresses if address == resolved]
        wanted = f"{resolved}, the address its host name resolves to (set OPSD_FABRIC_PREFIX to choose)"
    if not matches:
        have = ", ".join(f"{name} {address}" for name, address in addresses) or "none"
        raise LaunchError(f"{socket.gethostname()} has no interface with {wanted}; its IPv4 interfaces: {have}")
    return matches[0]


@dataclass(frozen=True)
class Ports:
    """One job's ports: a block of :attr:`BLOCK` from ``base``.

    base: torchrun's master; +1 the router, +2 its metrics; +10+s the weight-sync sender of pipeline
    stage s; +100+2i server i, +101+2i its NCCL port.
    """

    base: int
    BLOCK = 1000
    MAX_STAGES = 90
    MAX_SERVERS = 450

    @classmethod
    def for_job(cls, job_id: int, base: int | None = None) -> Ports:
        """``base``, or one of 20 blocks from 10000 chosen by the job id (jobs that share a node differ)."""
        return cls(base if base is not None else 10000 + (job_id % 20) * cls.BLOCK)

    @property
    def master(self) -> int:
        return self.base

    @property
    def router(self) -> int:
        return self.base + 1

    @property
    def router_metrics(self) -> int:
        return self.base + 2

    @property
    def sync(self) -> int:
        return self.base + 10

    def server(self, i: int) -> int:
        return self.base + 100 + 2 * i

    def server_nccl(self, i: int) -> int:
        return self.base + 101 + 2 * i

    def errors(self, servers: int, stages: int) -> list[str]:
        """What does not fit: too many servers or stages for the block, or a block that reaches into
        this node's ephemeral range or past the last port."""
        errors = []
        if servers > self.MAX_SERVERS:
            errors.append(f"{servers} servers: at most {self.MAX_SERVERS} fit a port block")
        if stages > self.MAX_STAGES:
            errors.append(f"{stages} pipeline stages: at most {self.MAX_STAGES} weight-sync ports fit a port block")
        end = self.base + self.BLOCK - 1
        low, high = ephemeral_range()
        if self.base < 1024 or end > 65535:
            errors.append(f"ports {self.base}-{end} are outside 1024-65535 (OPSD_PORT_BASE)")
        elif self.base <= high and end >= low:
            errors.append(f"ports {self.base}-{end} overlap this node's ephemeral range {low}-{high}: set "
                          f"OPSD_PORT_BASE so that the block of {self.BLOCK} ends below {low}")
        return errors


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The ports the kernel hands out to unbound sockets here (Linux's default where unknown)."""
    try:
        low, high = path.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999
