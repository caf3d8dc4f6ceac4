"""The wire over torch.distributed: the only module that calls it.

One gloo world group carries CPU tensors between any two ranks (a GPU server
with CPU clients stages through host memory); a NCCL group carries CUDA
tensors directly between GPU ranks; the server group all-reduces the
replicas' gradients. :func:`connect` starts them all and returns the wire.
A :class:`Heartbeat` through the rendezvous store sees a dead peer while no
message is expected from it. Under torchrun, :func:`join` first agrees on the
job's attempt (its restarts and its keys in the store) before any check is made.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from collafuse_hpc.runtime.launch import Launch, listen
from collafuse_hpc.runtime.wire import (
    HEADER_LEN,
    PART_LEN,
    Kind,
    Message,
    PeerFailure,
    Wire,
    decode_header,
    decode_parts,
    encode_header,
    encode_parts,
    error_message,
)

log = logging.getLogger("collafuse_hpc")


@dataclass(frozen=True)
class Attempt:
    """One start of the job's ranks, the same on every rank of it (see :func:`join`)."""

    restarts: int = 0  # earlier attempts of this job (torchrun restarts its workers); 0 under other launchers
    prefix: str = ""  # this attempt's keys in the store: none of another attempt's (empty: the store is new)


JOIN_POLL_S = 0.05  # [s] how often rank 0 looks for ranks that wait to join


def join(launch: Launch, timeout_s: float) -> Attempt:
    """Agree with every rank on this attempt of a torchrun job (other launchers start a
    job once: :class:`Attempt` ``()``).

    torchrun's agents restart all workers when one fails, but each agent counts only its
    own restarts (``TORCHELASTIC_RESTART_COUNT``): a node whose agent restarts its workers
    for another node's sake counts none. And the store that the agent of node 0 serves
    outlives the workers, with every earlier attempt's keys. So rank 0 counts the attempts
    in the store and tells each rank's newest process (named by a fresh token, which no
    earlier process can have) that count; the attempt's keys live under it. Every rank
    then gives its agent's count, and rank 0 publishes the largest, or the count of
    earlier attempts in the store if that is larger, as the job's restarts.
    """
    if launch.source != "torchrun":
        return Attempt()
    try:
        store = _store(launch, timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise _unreachable(launch, timeout_s, e) from None
    try:
        if launch.rank == 0:
            joins = store.add("collafuse/joins", 1)
            restarts = _admit(store, launch, joins, timeout_s)
        else:
            token = uuid.uuid4().hex
            store.set(f"collafuse/join/{launch.rank}", token)
            joins = int(store.get(f"collafuse/admitted/{token}"))
            ours = dist.PrefixStore(_prefix(joins), store)
            ours.set(f"restarts/{launch.rank}", str(launch.agent_restarts))
            restarts = int(ours.get("restarts"))
    except RuntimeError as e:  # the store's timeouts (DistStoreError, DistNetworkError) are RuntimeErrors
        raise RuntimeError(
            f"rank {launch.rank}: the ranks did not all join the job at the rendezvous {launch.master_addr}:"
            f"{launch.master_port} (torchrun) within {timeout_s:.0f} s: {str(e).splitlines()[0][:200]}"
        ) from None
    return Attempt(restarts, _prefix(joins))


def _unreachable(launch: Launch, timeout_s: float, e: Exception) -> RuntimeError:
    """The error of a rendezvous store that cannot be reached: its address and what to check."""
    return RuntimeError(
        f"rank {launch.rank}: could not reach the rendezvous at "
        f"{launch.master_addr}:{launch.master_port} ({launch.source}) within {timeout_s:.0f} s; "
        f"check MASTER_ADDR/MASTER_PORT and that the port is open: {e}"
    )


def _prefix(joins: int) -> str:
    return f"collafuse/attempt_{joins}"


def _admit(store: dist.Store, launch: Launch, joins: int, timeout_s: float) -> int:
    """Rank 0 of the attempt that the store counts as its ``joins``-th: tell that count to
    each rank's newest process until all have given their agent's restart count; publish
    and return the job's restarts. A token of an earlier attempt's process gets an answer
    that nobody reads."""
    ours = dist.PrefixStore(_prefix(joins), store)
    counts, told = {0: launch.agent_restarts}, {}
    deadline = time.monotonic() + timeout_s
    while len(counts) < launch.world_size:
        if time.monotonic() > deadline:
            missing = sorted(set(range(launch.world_size)) - set(counts))
            raise RuntimeError(f"rank(s) {missing} did not join")
        time.sleep(JOIN_POLL_S)
        for r in range(1, launch.world_size):
            if r in counts or not store.check([f"collafuse/join/{r}"]):
                continue
            token = store.get(f"collafuse/join/{r}").decode()
            if told.get(r) != token:
                store.set(f"collafuse/admitted/{token}", str(joins))
                told[r] = token
            if ours.check([f"restarts/{r}"]):
                counts[r] = int(ours.get(f"restarts/{r}"))
    restarts = max(joins - 1, *counts.values())
    ours.set("restarts", str(restarts))
    return restarts


def connect(
    launch: Launch,
    attempt: Attempt,
    device: torch.device,
    num_servers: int,
    describe: Callable[[int], str],
    timeout_s: float,
) -> DistWire:
    """Join the job's process groups and return this rank's wire (with its heartbeat running)."""
    nccl, server_group = _init_process_groups(launch, attempt, device, num_servers, timeout_s)
    heartbeat = Heartbeat(lambda: _within(attempt, _store_client(launch, timeout_s)), launch.rank)
    return DistWire(launch.rank, describe, device, nccl, server_group, timeout_s, heartbeat)


def _within(attempt: Attempt, store: dist.Store) -> dist.Store:
    """``store`` seen through this attempt's keys."""
    return dist.PrefixStore(attempt.prefix, store) if attempt.prefix else store


@functools.cache  # one per process: rank 0 serves it from join() on, for the process groups too
def _store(launch: Launch, timeout: timedelta) -> dist.Store:
    """The rendezvous store: rank 0 serves it on its MASTER_ADDR socket and the others
    connect, unless torchrun's agent serves it already (then every rank connects)."""
    if launch.rank != 0 or launch.agent_store:
        return _store_client(launch, timeout.total_seconds())
    # the socket stays open (launch keeps it) for as long as the store serves on it
    listener = listen(launch.master_addr, launch.master_port)
    return dist.TCPStore(
        launch.master_addr,
        launch.master_port,
        launch.world_size,
        True,
        timeout,
        wait_for_workers=False,
        master_listen_fd=listener.fileno(),
    )


def _store_client(launch: Launch, timeout_s: float) -> dist.Store:
    """A new connection to the rendezvous store (for a thread of its own)."""
    return dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, False, timedelta(seconds=timeout_s))


def _init_process_groups(
    launch: Launch, attempt: Attempt, device: torch.device, num_servers: int, timeout_s: float
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup]:
    """Start the gloo world group; return (NCCL group of the CUDA ranks if two or
    more, else None; the server group of ranks 0..num_servers-1).

    gloo carries CPU tensors between any two ranks (a GPU server with CPU
    clients stages through host memory); NCCL carries CUDA tensors directly
    between GPU ranks. The server group all-reduces the replicas' gradients,
    over NCCL when every server is on a GPU.
    """
    try:
        dist.init_process_group(
            "gloo",
            store=_within(attempt, _store(launch, timedelta(seconds=timeout_s))),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except RuntimeError as e:
        raise _unreachable(launch, timeout_s, e) from None
    on_cuda = [torch.zeros(1, dtype=torch.int64) for _ in range(launch.world_size)]  # tensors, not pickles
    dist.all_gather(on_cuda, torch.tensor([int(device.type == "cuda")]))
    kinds = ["cuda" if t.item() else "cpu" for t in on_cuda]
    cuda_ranks = [r for r, k in enumerate(kinds) if k == "cuda"]
    timeout = timedelta(seconds=timeout_s)
    nccl = dist.is_nccl_available() and len(cuda_ranks) >= 2
    servers = list(range(num_servers))
    server_backend = "nccl" if nccl and all(kinds[r] == "cuda" for r in servers) else "gloo"
    server_group = dist.new_group(servers, backend=server_backend, timeout=timeout)
    return (dist.new_group(cuda_ranks, backend="nccl", timeout=timeout) if nccl else None), server_group


class DistWire(Wire):
    """Sends and receives :class:`Message` objects over torch.distributed.

    Args:
        rank: this rank.
        describe: rank -> human name for error messages (Topology.describe).
        device: where received payloads should land.
        nccl_group: group of CUDA ranks; used when both peers are in it.
        timeout_s: bound on every wait, seconds.
    """

    def __init__(
        self,
        rank,
        describe,
        device: torch.device,
        nccl_group,
        server_group,
        timeout_s: float,
        heartbeat: Heartbeat | None = None,
    ):
        self.rank, self.describe, self.device, self.heartbeat = rank, describe, device, heartbeat
        self.timeout = timedelta(seconds=timeout_s)
        self.nccl_group, self.server_group = nccl_group, server_group
        self.nccl_ranks = set(dist.get_process_group_ranks(nccl_group)) if nccl_group else set()
        self._pending: list[tuple[dist.Work, torch.Tensor, int]] = []

    def check_alive(self, peers: list[int]) -> None:
        if self.heartbeat is None:
            return
        try:
            silent = self.heartbeat.silent(peers)
        except RuntimeError as e:
            raise PeerFailure(
                f"{self.describe(self.rank)} lost the rendezvous store (rank 0 gone?): {str(e).splitlines()[0][:160]}"
            ) from None
        if silent:
            raise PeerFailure(
                f"{self.describe(self.rank)}: {', '.join(map(self.describe, silent))} stopped its heartbeat "
                f"{self.heartbeat.limit_s:.0f} s ago (dead or stopped) while this rank worked for it"
            )

    def _via_nccl(self, peer: int) -> bool:
        return self.rank in self.nccl_ranks and peer in self.nccl_ranks

    def send(self, dst: int, msg: Message) -> None:
        self._post(dst, msg, self.nccl_group if self._via_nccl(dst) else None)

    def send_error(self, peers: list[int], round_: int, text: str) -> None:
        """ERROR goes to a NCCL peer over gloo as well: a pending receive of that peer sees
        the NCCL copy, and after a failed collective :meth:`probe` listens on gloo."""
        for p in peers:
            if self._via_nccl(p):
                try:
                    self._post(p, error_message(round_, text), None)
                except RuntimeError as e:  # the NCCL copy below may still reach it
                    log.warning("could not tell %s of this failure over gloo: %s", self.describe(p), str(e)[:200])
        super().send_error(peers, round_, text)

    def _post(self, dst: int, msg: Message, group) -> None:
        """Post the header, payload and labels of ``msg`` to ``dst`` on ``group`` (None: gloo)."""
        table = encode_parts(msg) if msg.parts else None
        tensors = [encode_header(msg, self.rank)]
        tensors += [t.contiguous() for t in (table, msg.payload, msg.labels) if t is not None]
        for t in tensors:
            t = t.to(self.device) if group is not None else t.cpu()
            try:
                self._pending.append((dist.isend(t, dst, group=group), t, dst))
            except RuntimeError as e:
                raise PeerFailure(
                    f"{self.describe(self.rank)} lost the connection sending {msg.kind.name} to "
                    f"{self.describe(dst)}: {str(e).splitlines()[0][:200]}"
                ) from None

    def flush(self, timeout_s: float | None = None) -> None:
        pending, self._pending = self._pending, []
        for work, _, dst in pending:
            self._wait(lambda w=work: w, dst, "a send to complete", timeout_s, "to")

    def _wait(
        self, post: Callable[[], dist.Work], peer: int, what: str, timeout_s: float | None = None, way: str = "from"
    ) -> None:
        """Post an operation and wait for it; any failure becomes PeerFailure naming ``peer``
        (posting itself raises when the peer's connection is already closed)."""
        bound = self.timeout if timeout_s is None else timedelta(seconds=timeout_s)
        try:
            post().wait(bound)
        except RuntimeError as e:
            reason = "timed out" if "imed out" in str(e) else "lost the connection"
            raise PeerFailure(
                f"{self.describe(self.rank)} {reason} waiting for {what} {way} {self.describe(peer)} "
                f"(bound {bound.total_seconds():.0f} s): {str(e).splitlines()[0][:200]}"
            ) from None

    def _recv_tensor(self, t: torch.Tensor, src: int, what: str, timeout_s: float | None = None) -> torch.Tensor:
        group = self.nccl_group if self._via_nccl(src) else None
        t = t.to(self.device) if group is not None else t
        self._wait(lambda: dist.irecv(t, src, group=group), src, what, timeout_s)
        return t

    def recv(self, src: int, kind: Kind, round_: int, timeout_s: float | None = None) -> Message:
        what = f"{kind.name} of round {round_}"
        header = decode_header(
            self._recv_tensor(torch.empty(HEADER_LEN, dtype=torch.int64), src, what, timeout_s).cpu(), src
        )
        if header is None:
            raise PeerFailure(f"{self.describe(self.rank)} got a malformed header from {self.describe(src)}")
        parts = ()
        if header.parts:
            parts = decode_parts(self._recv_tensor(torch.empty((header.parts, PART_LEN), dtype=torch.int64), src, what))
        payload = None
        if header.payload_shape is not None:
            # pinned host memory lets the copy to a GPU overlap with what follows
            pinned = self.device.type == "cuda" and not self._via_nccl(src)
            buffer = torch.empty(header.payload_shape, dtype=header.payload_dtype, pin_memory=pinned)
            payload = self._recv_tensor(buffer, src, what).to(self.device, non_blocking=True)
        labels = None
        if header.has_labels:
            labelled = sum(p.count for p in parts if p.labels)
            labels = self._recv_tensor(torch.empty(labelled, dtype=torch.int64), src, what).to(self.device)
        msg = Message(header.kind, header.round, parts, header.count, payload, labels)
        return self._check(src, msg, kind, round_)

    def barrier(self, timeout_s: float | None = None) -> None:
        bound = self.timeout if timeout_s is None else timedelta(seconds=timeout_s)
        try:
            dist.monitored_barrier(timeout=bound, wait_all_ranks=True)
        except RuntimeError as e:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
            missing = [int(r) for r in found.group(1).replace(",", " ").split()] if found else []
            if missing:
                raise PeerFailure(
                    f"{self.describe(self.rank)}: {', '.join(map(self.describe, missing))} did not reach the "
                    f"barrier within {bound.total_seconds():.0f} s (dead or stuck)"
                ) from None
            raise PeerFailure(f"{self.describe(self.rank)}: barrier failed: {str(e)[:300]}", unnamed=True) from None

    def allreduce_servers(self, tensor: torch.Tensor) -> None:
        on_gloo = dist.get_backend(self.server_group) == "gloo"
        buf = tensor.cpu() if on_gloo else tensor
        try:
            dist.all_reduce(buf, group=self.server_group)
        except RuntimeError as e:
            others = [r for r in dist.get_process_group_ranks(self.server_group) if r != self.rank]
            raise PeerFailure(
                f"{self.describe(self.rank)} lost a server replica ({', '.join(map(self.describe, others))}) "
                f"during the gradient all-reduce: {str(e).splitlines()[0][:200]}"
            ) from None
        if buf is not tensor:
            tensor.copy_(buf)

    def _agreement(self, value: int) -> Callable[[], int]:
        """Post a MAX all-reduce of ``value`` over all ranks; the returned function waits
        (bounded) for the result. A failure there is unnamed: a collective does not say who."""
        t = torch.tensor([value], dtype=torch.int64)
        try:
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        except RuntimeError as e:
            work, error = None, e

        def result() -> int:
            try:
                if work is None:
                    raise error
                work.wait(self.timeout)
            except RuntimeError as e:
                raise PeerFailure(
                    f"{self.describe(self.rank)} lost a rank during an all-ranks agreement: "
                    f"{str(e).splitlines()[0][:200]}",
                    unnamed=True,
                ) from None
            return int(t.item())

        return result

    def max_over_ranks(self, value: int) -> int:
        return self._agreement(value)()

    def any_rank_later(self, flag: bool) -> Callable[[], bool]:
        result = self._agreement(int(flag))
        return lambda: result() > 0

    def probe(self, src: int, timeout_s: float) -> str | None:
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        try:
            dist.irecv(header, src).wait(timedelta(seconds=timeout_s))
            decoded = decode_header(header, src)
            if decoded is None or decoded.kind != Kind.ERROR:
                return None
            text = torch.empty(decoded.count, dtype=torch.uint8)
            dist.irecv(text, src).wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            if "imed out" in str(e):
                return None
            return f"{self.describe(src)} is gone (its connection closed): {str(e).splitlines()[0][:160]}"
        return bytes(text.tolist()).decode(errors="replace")


class Heartbeat:
    """Sees a dead peer while no message is expected from it (the server sampling
    for its clients), without touching the data connections.

    Every rank bumps its counter in the rendezvous store every ``period_s`` from a
    daemon thread, over a store connection of its own; :meth:`silent` names the
    peers whose counter has not moved for ``limit_s`` seconds.

    Args:
        connect: returns a new client of the rendezvous store (called twice).
        rank: this rank.
    """

    def __init__(self, connect: Callable[[], object], rank: int, period_s: float = 1.0, limit_s: float = 10.0):
        self.rank, self.period_s, self.limit_s = rank, period_s, limit_s
        self._beats, self._reads = connect(), connect()  # one connection per thread
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (counter, when it last moved)
        self._last_check = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"collafuse/heartbeat/{rank}"

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self._beats.add(self._key(self.rank), 1)
            except RuntimeError:  # the store's rank has gone: the wire reports that
                return
            self._stop.wait(self.period_s)

    def silent(self, peers: list[int]) -> list[int]:
        """Peers silent for ``limit_s`` (checked at most once per ``period_s``; [] in between).
        Raises RuntimeError when the store itself cannot be reached."""
        now = time.monotonic()
        if now - self._last_check < self.period_s:
            return []
        self._last_check = now
        out = []
        for p in peers:
            count = int(self._reads.add(self._key(p), 0))
            last_count, since = self._seen.get(p, (-1, now))
            if count != last_count:
                self._seen[p] = (count, now)
            elif now - since > self.limit_s:
                out.append(p)
        return out

    def stop(self) -> None:
        self._stop.set()
