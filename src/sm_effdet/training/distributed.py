"""Hosts, ranks and rendezvous for DDP across the GPUs of one instance and across instances.

SageMaker starts the same container on every host of a job and tells each, in
resourceconfig.json, the sorted host list and its own name: the master is hosts[0], the node
rank is the host's index. Lightning then starts one process per GPU on each node (or one per
node on CPU, with gloo). A watchdog on a small key-value store of the master's makes a failure
on any rank end every rank quickly, with the reason, instead of leaving them to wait in a
collective until MaxRuntime.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from ..environment import TrainingEnvironment
from ..errors import UserInputError

log = logging.getLogger(__name__)

# AWS's own PyTorch launcher uses 7777; the watchdog's store listens on the next port.
DEFAULT_PORT = 7777
RESOLVE_TIMEOUT_S = float(os.environ.get("SM_EFFDET_RESOLVE_TIMEOUT_S", 300))
WATCH_INTERVAL_S = 2.0
FAILED_KEY = "sm_effdet/failed"
FINISHED_KEY = "sm_effdet/finished"


@dataclass(frozen=True)
class Layout:
    hosts: tuple[str, ...]
    node_rank: int
    processes_per_node: int
    local_rank: int
    backend: str
    master_addr: str
    master_port: int

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.processes_per_node

    @property
    def global_rank(self) -> int:
        return self.node_rank * self.processes_per_node + self.local_rank

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (
            f"layout: {self.num_nodes} node(s) x {self.processes_per_node} process(es) = world "
            f"size {self.world_size}, backend {self.backend}, this process: global rank "
            f"{self.global_rank} (node {self.node_rank} {self.hosts[self.node_rank]}, local rank "
            f"{self.local_rank}); master {self.master_addr}:{self.master_port}"
        )


def resolve(host: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> str:
    """The host's address, retrying while the job's DNS names appear; a clear error if never."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return socket.gethostbyname(host)
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise UserInputError(
                    f"host '{host}' from resourceconfig.json did not resolve within "
                    f"{timeout_s:.0f} s ({exc}); check the job's network (VPC DNS) settings."
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def plan_layout(env: TrainingEnvironment, devices: int | str, gpus: int) -> Layout:
    """Nodes from resourceconfig.json, processes per node from the GPUs (one on CPU)."""
    hosts = tuple(env.hosts)
    if env.current_host not in hosts:
        raise UserInputError(
            f"resourceconfig.json names current_host '{env.current_host}', which is not among its "
            f"hosts {list(hosts)}."
        )
    if gpus:
        per_node = gpus if devices == "auto" else int(devices)
        if per_node > gpus:
            raise UserInputError(
                f"hyperparameter 'devices' is {devices} but this instance has {gpus} GPU(s); "
                "lower it or use 'auto'."
            )
    else:
        per_node = 1
    return Layout(
        hosts=hosts,
        node_rank=hosts.index(env.current_host),
        processes_per_node=per_node,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        backend="nccl" if gpus else "gloo",
        master_addr=os.environ.get("MASTER_ADDR") or hosts[0],
        master_port=int(os.environ.get("MASTER_PORT", DEFAULT_PORT)),
    )


def set_rendezvous(layout: Layout, env: TrainingEnvironment) -> None:
    """Environment variables that Lightning's DDP reads to find the other processes."""
    if layout.num_nodes > 1:
        for host in layout.hosts:
            resolve(host)
    os.environ["MASTER_ADDR"] = layout.master_addr
    os.environ["MASTER_PORT"] = str(layout.master_port)
    os.environ["NODE_RANK"] = str(layout.node_rank)
    os.environ["WORLD_SIZE"] = str(layout.world_size)
    interface = env.network_interface_name
    if interface and layout.num_nodes > 1:
        variable = "NCCL_SOCKET_IFNAME" if layout.backend == "nccl" else "GLOO_SOCKET_IFNAME"
        os.environ.setdefault(variable, interface)


class FailureWatchdog:
    """Ends this process when another rank reports a failure, or when the master is gone."""

    def __init__(self, layout: Layout, on_peer_failure: Callable[[str], None]) -> None:
        from torch.distributed import TCPStore

        self.layout = layout
        self.on_peer_failure = on_peer_failure
        self.store = TCPStore(
            layout.master_addr,
            layout.master_port + 1,
            world_size=layout.world_size,
            is_master=layout.global_rank == 0,
            timeout=timedelta(seconds=RESOLVE_TIMEOUT_S),
            wait_for_workers=False,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="failure-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                failed = self.store.check([FAILED_KEY])
                reason = self.store.get(FAILED_KEY).decode() if failed else None
            except Exception:
                if self._stop.is_set():
                    return
                reason = f"the master process on {self.layout.master_addr} is gone"
            if reason is not None and not self._stop.is_set():
                self.on_peer_failure(reason)
                return

    def report_failure(self, reason: str) -> None:
        try:
            rank = self.layout.global_rank
            host = self.layout.hosts[self.layout.node_rank]
            self.store.compare_set(FAILED_KEY, "", f"rank {rank} on {host} failed: {reason}")
        except Exception:
            pass

    def finish(self, timeout_s: float = 60) -> None:
        """Stop watching; the master keeps its store up until every rank has stopped."""
        self._stop.set()
        try:
            self.store.add(FINISHED_KEY, 1)
            if self.layout.global_rank == 0:
                deadline = time.monotonic() + timeout_s
                while self.store.add(FINISHED_KEY, 0) < self.layout.world_size:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
        except Exception:
            pass
