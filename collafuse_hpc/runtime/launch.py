"""Rank discovery, devices and threads per rank. The only module that reads the
environment (process groups are started by the wire, :mod:`.dist_wire`).

Discovery order:
1. torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT. Its
   agent already serves the rendezvous store there (TORCHELASTIC_USE_AGENT_STORE):
   every rank connects to it as a client. TORCHELASTIC_RESTART_COUNT is this node's
   agent's count of restarts only; the ranks agree on the job's (dist_wire.join).
2. Open MPI's mpirun (OMPI_COMM_WORLD_SIZE). Checked before SLURM because an
   mpirun inside an sbatch allocation inherits the batch step's SLURM_PROCID=0.
3. srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, master = first host of
   SLURM_JOB_NODELIST, port = 20000 + job id mod 20000.
4. Other MPI launchers (PMI_SIZE, PMIX_RANK): mpi4py gives rank, size and the
   local rank by node; rank 0 broadcasts its address and a free port.
5. Otherwise a single process.
MASTER_ADDR / MASTER_PORT in the environment override the derived address (under MPI,
rank 0's environment, which it broadcasts: mpirun passes a variable to other nodes
only with -x).

The rendezvous store is unauthenticated. Unless torchrun's agent serves it, rank 0
listens on MASTER_ADDR's interface only (127.0.0.1 stays on this machine; a
cluster's internal address stays on that network), on a socket it keeps from
choosing the port to handing it to the store, so no other process can take the
port in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collafuse_hpc.config import Config

if TYPE_CHECKING:  # torch loads when a device is resolved: the command line's signal handlers come first
    import torch

log = logging.getLogger("collafuse_hpc")


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | mpi | single
    agent_store: bool = False  # torchrun's agent serves the store at MASTER_ADDR:MASTER_PORT
    agent_restarts: int = 0  # TORCHELASTIC_RESTART_COUNT: this node's agent's, not the job's (dist_wire.join)


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-005,007],cpu1``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    assert m, nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _resolvable(host: str) -> str:
    """``host`` if it resolves, else 127.0.0.1 (single-node test clusters use fake names)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        return "127.0.0.1"


def _from_mpi(env: dict[str, str]) -> Launch:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    addr = port = None
    if rank == 0:  # its environment decides for all: mpirun passes a variable to other nodes only with -x
        addr = env.get("MASTER_ADDR") or (
            "127.0.0.1" if local_size == size else socket.gethostbyname(socket.gethostname())
        )
        # a free port is kept open for the store: no race for it
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else listen(addr, 0).getsockname()[1]
    addr, port = comm.bcast((addr, port), root=0)
    return Launch(rank, size, local_rank, local_size, addr, port, "mpi")


def discover(env: dict[str, str] | None = None) -> Launch:
    """Find this process's rank from torchrun, SLURM or MPI variables (in that order)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
            env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
        )
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _from_mpi(env)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        nodes = int(env.get("SLURM_NNODES", 1))
        ntasks = int(env["SLURM_NTASKS"])
        host = env.get("MASTER_ADDR") or _resolvable(_first_slurm_host(env["SLURM_JOB_NODELIST"]))
        return Launch(
            int(env["SLURM_PROCID"]),
            ntasks,
            int(env.get("SLURM_LOCALID", 0)),
            -(-ntasks // nodes),
            host,
            int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)),
            "slurm",
        )
    if "PMI_SIZE" in env or "PMIX_RANK" in env:
        return _from_mpi(env)
    return Launch(0, 1, 0, 1, "127.0.0.1", 0, "single")


RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "PMI_RANK", "PMIX_RANK")
# config keys whose empty value is taken from the environment (a site sets them once for all runs)
ENV_DEFAULTS = {"inception_path": "COLLAFUSE_INCEPTION", "cache_dir": "COLLAFUSE_CACHE"}


def env_rank(env: dict[str, str] | None = None) -> int | None:
    """This process's rank as its launcher set it, without starting MPI (for log lines
    before discovery); None outside a launched job."""
    env = os.environ if env is None else env
    return next((int(env[v]) for v in RANK_VARIABLES if env.get(v, "").isdigit()), None)


def apply_env_defaults(cfg: Config, env: dict[str, str] | None = None) -> None:
    """Fill the ``eval`` keys left empty from $COLLAFUSE_INCEPTION and $COLLAFUSE_CACHE."""
    env = os.environ if env is None else env
    for key, variable in ENV_DEFAULTS.items():
        if not getattr(cfg.eval, key) and env.get(variable):
            setattr(cfg.eval, key, env[variable])


def threads_per_rank(launch: Launch, configured: int) -> int:
    """Torch threads for this rank: the configured number, else the cores this
    process may use divided by the ranks on its node (at least 1)."""
    if configured > 0:
        return configured
    return max(1, len(os.sched_getaffinity(0)) // max(1, launch.local_world_size))


@contextlib.contextmanager
def torch_threads(configured: int) -> Iterator[None]:
    """Run the body with ``configured`` torch threads (0: leave them as they are), and
    give the caller its own number back after. A library must not change it for good;
    and on cores shared with other work, more threads than asked for make torch's CPU
    kernels spin-wait (measured: evaluate 17x slower with 2 threads on 2 busy cores)."""
    import torch

    before = torch.get_num_threads()
    if configured > 0:
        torch.set_num_threads(configured)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(choice: str, launch: Launch) -> torch.device:
    """``auto`` -> the GPU given by LOCAL_RANK if CUDA is available, else CPU.

    Calls ``torch.cuda.set_device`` before any NCCL communicator exists.
    """
    import torch

    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"rank {launch.rank}: device 'cuda' requested but CUDA is not available")
    gpus = torch.cuda.device_count()
    if launch.local_rank >= gpus:
        raise ValueError(
            f"rank {launch.rank} is local rank {launch.local_rank} on a node with {gpus} GPU(s): start at most "
            f"{gpus} GPU ranks per node (--ntasks-per-node, --gres) or set this role's device to cpu"
        )
    device = torch.device("cuda", launch.local_rank)
    torch.cuda.set_device(device)
    return device


_listeners: dict[tuple[str, int], socket.socket] = {}  # (MASTER_ADDR, port) -> listening socket of rank 0


def listen(addr: str, port: int) -> socket.socket:
    """A socket listening on ``addr``'s interface only, at ``port`` (0: a free one),
    kept open for the rendezvous store; the one discovery reserved, if any. ValueError
    naming the address and port when it cannot be had."""
    if (addr, port) in _listeners:
        return _listeners[(addr, port)]
    try:
        host = socket.gethostbyname(addr)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1024)
    except OSError as e:
        why = "is in use (another job?): set MASTER_PORT" if e.errno == 98 else "cannot be bound on this host"
        raise ValueError(
            f"rank 0: the rendezvous at MASTER_ADDR {addr}, port {port} {why} ({e.strerror}); MASTER_ADDR must be "
            "an address of rank 0's host"
        ) from None
    _listeners[(addr, s.getsockname()[1])] = s
    return s
