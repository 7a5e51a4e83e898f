"""The process group and the few collectives minrm uses, each a named helper. One code path for 1..N
processes: `python -m minrm.train` starts a one-process group itself, `torchrun` sets the rank variables
for many. gloo on CPU, NCCL on GPU.
"""

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from minrm.config import fail


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # FSDP's: every process, whatever --context_parallel_size
    # Which rows: with --context_parallel_size C, the C processes of a group hold the same rows, so the rows are
    # dealt to world_size / C groups (`init_distributed` sets these; C = 1: rank and world_size, groups None).
    data_rank: int | None = None
    data_size: int | None = None
    context: dist.ProcessGroup | None = None  # the C processes of this one's group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: int | None = None, context_size: int = 1) -> Dist:
    """Join (without torchrun: create) the process group and build the mesh: on more than one node 2-D, replicate
    across nodes and shard within one (HSDP: all-gathers stay on intra-node links). `timeout_minutes` bounds every
    collective (None: torch's default, 10 min NCCL, 30 min gloo). `context_size` C groups a node's processes C by C."""
    if "RANK" not in os.environ:  # plain `python -m minrm.train`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")  # port 0: the store binds a free one
    rank, world, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = torch.cuda.is_available()
    device, backend = (torch.device("cuda", local_rank), "nccl") if cuda else (torch.device("cpu"), "gloo")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
        dist.init_process_group(backend, device_id=device if cuda else None, timeout=timeout)  # env: RANK, WORLD_SIZE
    hsdp = world > local_world
    shape, names = ((world // local_world, local_world), ("replicate", "shard")) if hsdp else ((world,), ("shard",))
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    dims = " x ".join(f"{name} {size}" for name, size in zip(names, mesh.shape))
    minutes = dist.distributed_c10d._get_default_store().timeout.total_seconds() / 60  # the group's timeout
    nodes = f", gloo groups on {gloo_interface()}" if hsdp else ""
    if context_size < 1 or local_world % context_size:
        fail(f"context_parallel_size {context_size}", f"must divide the {local_world} processes of a node")
    d = Dist(rank, world, local_rank, device, mesh, rank // context_size, world // context_size)
    if context_size > 1:
        d.context, _ = dist.new_subgroups(context_size)  # ranks [k C, (k + 1) C): within a node
        nodes += f"; context parallel (Ulysses): {d.data_size} groups (data) x {context_size} processes (context)"
    print0(
        f"distributed: {world} process{'es' if world > 1 else ''}, {local_world} per node, {backend}, "
        f"{'HSDP' if hsdp else 'FSDP'} mesh ({dims}), collective timeout {minutes:g} min{nodes}"
    )
    return d


def gloo_interface() -> str:
    """Where this process's gloo groups (the checkpoint writer's; all on CPU) connect from, by torch's rule: the
    interfaces GLOO_SOCKET_IFNAME names, else the first bindable address the hostname resolves to, else loopback."""
    if names := os.environ.get("GLOO_SOCKET_IFNAME"):
        return f"interface {names} (GLOO_SOCKET_IFNAME)"
    host, found = socket.gethostname(), []
    with contextlib.suppress(OSError):
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    address, said = "127.0.0.1", f"127.0.0.1 ({host} resolves to no address here)"
    for family, kind, proto, _, where in found:
        with socket.socket(family, kind, proto) as s, contextlib.suppress(OSError):
            s.bind(where)
            address, said = where[0], f"{where[0]}, the address of hostname {host}"
            break
    if ipaddress.ip_address(address).is_loopback:
        said += "; other nodes cannot reach a loopback address: set GLOO_SOCKET_IFNAME (docs/checkpointing.md)"
    return said


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (and everywhere before the group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (every rank must call this)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(n: int, device: torch.device) -> int:
    """The largest of every rank's `n` (every rank must call this)."""
    t = torch.tensor(n, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (every rank must call this)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, name: str, waiting_for: str) -> list:
    """Every rank's `obj`, in rank order (every rank must call this). The ranks first meet through the store, so
    that work of unbounded length before it (scoring a share of a file) never meets the collective timeout."""
    post(f"{name}/{dist.get_rank()}", {})
    for r in range(dist.get_world_size()):
        wait_for_post(f"{name}/{r}", f"rank {r} to {waiting_for}")
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# Signals through the process group's key-value store (torchrun's TCPStore): for waiting on work of
# unbounded length (building the dataset cache) without a collective, whose timeout would kill it.


def post(name: str, value: dict) -> None:
    """Leave `value` under `name` in the store, for the processes that `wait_for_post` it."""
    dist.distributed_c10d._get_default_store().set(f"minrm/{name}", json.dumps(value))


def rank0_alone(fn, name: str, waiting_for: str):
    """`fn()` on rank 0 (its result; None elsewhere) while the others wait outside any collective (a Hub download
    never meets its timeout). Rank 0's error reaches every rank as its message."""
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:
            post(name, {"error": f"{type(e).__name__}: {e}"})
            raise
        post(name, {})
        return result
    if error := wait_for_post(name, waiting_for).get("error"):
        raise SystemExit(f"minrm: error: rank 0 failed to {waiting_for.removeprefix('rank 0 to ')}: {error}")
    return None


def wait_for_post(name: str, waiting_for: str | None = None) -> dict:
    """The value posted under `name`, polling the store once a second (no timeout: the poster posts its error, and
    the poll raises when the store's host is gone); with `waiting_for`, says once a minute what it waits for."""
    store, key = dist.distributed_c10d._get_default_store(), f"minrm/{name}"
    start = last = time.monotonic()
    while not store.check([key]):
        time.sleep(1)
        if waiting_for and time.monotonic() - last >= 60:
            last = time.monotonic()
            print(f"rank {dist.get_rank()}: waiting for {waiting_for} ({(last - start) / 60:.0f} min)", flush=True)
    return json.loads(store.get(key))
