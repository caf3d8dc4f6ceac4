"""Typed point-to-point messages between a client and its server. The only
module that sends or receives.

Every message is a fixed header, int64 [HEADER_LEN]::

    [MAGIC, kind, round, count, C, H, W, dtype code, t_c, sender rank, has labels]

followed by the payload when its dtype code is not 0: float [count, C, H, W]
for images, float32 [count] for losses, uint8 [count] (UTF-8 text) for errors;
then, only for clients that opted in to sharing labels, int64 [count] labels. Sends and
receives are posted in a fixed order (NCCL has no tags and no receive from any
source), and every wait is bounded by the process group's timeout. A failing
rank sends ERROR to its peers; a receiver turns ERROR, a closed connection or
a timeout into :class:`PeerFailure` naming the peer.
"""

from __future__ import annotations

import enum
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .watchdog import Heartbeat

MAGIC = 0x43465553  # "CFUS"
HEADER_LEN = 11
DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.uint8}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config names


class Kind(enum.IntEnum):
    TRAIN = 1  # client -> server: x_c [B, C, H, W] of one round (+ labels [B] if shared)
    TRAIN_REPLY = 2  # server -> client: server loss on that client's x_c, float32 [1]
    SAMPLE_REQUEST = 3  # client -> server: count = n samples wanted (+ labels [n] if shared)
    SAMPLE_REPLY = 4  # server -> client: x_h at the hand-over step [n, C, H, W]
    ERROR = 9  # either way: the sender failed; payload is the reason (UTF-8)


class PeerFailure(RuntimeError):
    """A peer failed, vanished or timed out; the message names it when it can be
    known (``unnamed`` is True after a failed collective, which does not say who)."""

    def __init__(self, text: str, unnamed: bool = False):
        super().__init__(text)
        self.unnamed = unnamed


@dataclass
class Message:
    kind: Kind
    round: int
    t_c: int = 0
    count: int = 0  # images (or values) in the payload; n requested for SAMPLE_REQUEST
    payload: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # int64 [count], only when the client shares labels

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: header, payload and labels."""
        tensors = [t for t in (self.payload, self.labels) if t is not None]
        return HEADER_LEN * 8 + sum(t.numel() * t.element_size() for t in tensors)


def error_message(round_: int, text: str) -> Message:
    data = torch.frombuffer(bytearray(text.encode()[:4096] or b"?"), dtype=torch.uint8)
    return Message(Kind.ERROR, round_, count=data.numel(), payload=data)


class Wire:
    """What a role's loop needs from a transport (implemented below)."""

    describe: Callable[[int], str]
    rank: int

    def send(self, dst: int, msg: Message) -> None:
        """Post ``msg`` to ``dst`` without blocking; :meth:`flush` waits for it."""
        raise NotImplementedError

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every posted send has completed (bounded by ``timeout_s`` or the wire's)."""
        raise NotImplementedError

    def recv(self, src: int, kind: Kind, round_: int, timeout_s: float | None = None) -> Message:
        """Next message from ``src``; it must be ``kind`` for ``round_``.

        ``timeout_s`` replaces the wire's bound, for waits on work the peer is known
        to be doing (its sampling). Raises PeerFailure when the peer sent ERROR,
        died or timed out.
        """
        raise NotImplementedError

    def barrier(self, timeout_s: float | None = None) -> None:
        """All ranks meet (bounded by ``timeout_s`` or the wire's); names the ranks that did not arrive."""
        raise NotImplementedError

    def check_alive(self, peers: list[int]) -> None:
        """Raise PeerFailure naming a peer that died while no message is expected from it
        (cheap; call it often during long work for those peers)."""
        raise NotImplementedError

    def allreduce_servers(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place over the server ranks (servers only, all of them)."""
        raise NotImplementedError

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` over all ranks: one small collective (bounded)."""
        raise NotImplementedError

    def any_rank_later(self, flag: bool) -> Callable[[], bool]:
        """Start agreeing whether any rank passes True; the returned function waits for
        the answer. Lets ranks agree on a flag without a per-round synchronization point
        (this default answers at once; DistWire's does not block)."""
        answer = self.max_over_ranks(int(flag)) > 0
        return lambda: answer

    def probe(self, src: int, timeout_s: float) -> str | None:
        """After a failed collective, learn what happened to peer ``src``: the text of
        an ERROR it sent, a note that its connection is closed, or None (no news
        within ``timeout_s``)."""
        raise NotImplementedError

    def send_error(self, peers: list[int], round_: int, text: str) -> None:
        """Best effort: tell ``peers`` that this rank failed, waiting at most a few seconds."""
        for p in peers:
            try:
                self.send(p, error_message(round_, text))
            except RuntimeError:
                pass
        try:
            self.flush(timeout_s=5.0)
        except RuntimeError:
            pass

    def _check(self, src: int, msg: Message, kind: Kind, round_: int) -> Message:
        """Turn ERROR or an unexpected message from ``src`` into PeerFailure."""
        if msg.kind == Kind.ERROR:
            text = bytes(msg.payload.cpu().tolist()).decode(errors="replace")
            raise PeerFailure(text if text.startswith("rank ") else f"{self.describe(src)} failed: {text}")
        if msg.kind != kind or msg.round != round_:
            raise PeerFailure(
                f"protocol error: {self.describe(self.rank)} expected {kind.name} of round "
                f"{round_} from {self.describe(src)}, got {msg.kind.name} of round {msg.round}"
            )
        return msg


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
                except RuntimeError:
                    pass
        super().send_error(peers, round_, text)

    def _post(self, dst: int, msg: Message, group) -> None:
        """Post the header, payload and labels of ``msg`` to ``dst`` on ``group`` (None: gloo)."""
        payload = msg.payload
        shape = (0, 0, 0) if payload is None or payload.ndim < 4 else tuple(payload.shape[1:])
        dtype = 0 if payload is None else DTYPE_CODES[payload.dtype]
        header = torch.tensor(
            [MAGIC, int(msg.kind), msg.round, msg.count, *shape, dtype, msg.t_c, self.rank, msg.labels is not None],
            dtype=torch.int64,
        )
        tensors = [header] + [t.contiguous() for t in (payload, msg.labels) if t is not None]
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
        header = self._recv_tensor(torch.empty(HEADER_LEN, dtype=torch.int64), src, what, timeout_s).cpu()
        magic, k, rnd, count, c, h, w, dtype, t_c, sender, has_labels = header.tolist()
        if magic != MAGIC or sender != src or k not in Kind._value2member_map_:
            raise PeerFailure(f"{self.describe(self.rank)} got a malformed header from {self.describe(src)}")
        payload = None
        if dtype:
            shape = (count, c, h, w) if c else (count,)
            # pinned host memory lets the copy to a GPU overlap with what follows
            pinned = self.device.type == "cuda" and not self._via_nccl(src)
            payload = self._recv_tensor(torch.empty(shape, dtype=DTYPES[dtype], pin_memory=pinned), src, what)
            payload = payload.to(self.device, non_blocking=True)
        labels = None
        if has_labels:
            labels = self._recv_tensor(torch.empty(count, dtype=torch.int64), src, what).to(self.device)
        return self._check(src, Message(Kind(k), rnd, t_c, count, payload, labels), kind, round_)

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
            magic, k, _, count, *_ = header.tolist()
            if magic != MAGIC or k != Kind.ERROR:
                return None
            text = torch.empty(count, dtype=torch.uint8)
            dist.irecv(text, src).wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            if "imed out" in str(e):
                return None
            return f"{self.describe(src)} is gone (its connection closed): {str(e).splitlines()[0][:160]}"
        return bytes(text.tolist()).decode(errors="replace")


class LocalWire(Wire):
    """In-process transport: every role runs in a thread of one process.

    Messages are cloned on send, as if they had crossed a network, and land on the
    receiver's device, so the same role loop runs unchanged; used by
    ``--in-process`` and the equivalence test.
    """

    def __init__(self, rank: int, describe, hub: LocalHub, device: torch.device):
        self.rank, self.describe, self.hub, self.device = rank, describe, hub, device

    def send(self, dst: int, msg: Message) -> None:
        payload, labels = (None if t is None else t.detach().clone() for t in (msg.payload, msg.labels))
        self.hub.queue(self.rank, dst).put(Message(msg.kind, msg.round, msg.t_c, msg.count, payload, labels))

    def flush(self, timeout_s: float | None = None) -> None:
        pass

    def recv(self, src: int, kind: Kind, round_: int, timeout_s: float | None = None) -> Message:
        bound = self.hub.timeout_s if timeout_s is None else timeout_s
        try:
            msg = self.hub.queue(src, self.rank).get(timeout=bound)
        except queue.Empty:
            raise PeerFailure(
                f"{self.describe(self.rank)} timed out waiting for {kind.name} of round {round_} "
                f"from {self.describe(src)} (bound {bound:.0f} s)"
            ) from None
        payload, labels = (None if t is None else t.to(self.device) for t in (msg.payload, msg.labels))
        return self._check(src, Message(msg.kind, msg.round, msg.t_c, msg.count, payload, labels), kind, round_)

    def check_alive(self, peers: list[int]) -> None:
        if self.hub.failed.is_set():
            raise PeerFailure(f"{self.describe(self.rank)}: another role failed")

    def barrier(self, timeout_s: float | None = None) -> None:
        try:
            self.hub.barrier.wait(self.hub.timeout_s if timeout_s is None else timeout_s)
        except threading.BrokenBarrierError:
            raise PeerFailure(f"{self.describe(self.rank)}: barrier failed (a role did not arrive)") from None

    def allreduce_servers(self, tensor: torch.Tensor) -> None:
        self.hub.server_sum(tensor, "gradient all-reduce")

    def max_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self.hub.world_max(t, "all-ranks agreement")
        return int(t.item())

    def probe(self, src: int, timeout_s: float) -> str | None:
        try:
            msg = self.hub.queue(src, self.rank).get(timeout=timeout_s)
        except queue.Empty:
            return None
        return bytes(msg.payload.tolist()).decode(errors="replace") if msg.kind == Kind.ERROR else None


class _Reduction:
    """An all-reduce among ``n`` threads: all add, all read, then one resets."""

    def __init__(self, n: int, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], timeout_s: float):
        self.op, self.timeout_s = op, timeout_s
        self._lock = threading.Lock()
        self._acc: torch.Tensor | None = None
        self.added = threading.Barrier(n)
        self.read = threading.Barrier(n, action=self._reset)

    def _reset(self) -> None:
        self._acc = None

    def __call__(self, tensor: torch.Tensor, what: str) -> None:
        with self._lock:
            self._acc = tensor.clone() if self._acc is None else self.op(self._acc, tensor)
        try:
            self.added.wait(self.timeout_s)
            tensor.copy_(self._acc)
            self.read.wait(self.timeout_s)
        except threading.BrokenBarrierError:
            raise PeerFailure(f"a role did not reach the {what}") from None


class LocalHub:
    """Queues between the in-process roles, one per (sender, receiver) pair, and
    the barrier and reductions they share."""

    def __init__(self, world_size: int, num_servers: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.failed = threading.Event()  # set by abort(): a role failed
        self.barrier = threading.Barrier(world_size)
        self._queues: dict[tuple[int, int], queue.Queue] = {}
        self._lock = threading.Lock()
        self.server_sum = _Reduction(num_servers, torch.add, timeout_s)
        self.world_max = _Reduction(world_size, torch.maximum, timeout_s)

    def abort(self) -> None:
        """Wake every role waiting at a barrier (a role failed)."""
        self.failed.set()
        for b in (self.barrier, *(r.added for r in (self.server_sum, self.world_max))):
            b.abort()
        for b in (self.server_sum.read, self.world_max.read):
            b.abort()

    def queue(self, src: int, dst: int) -> queue.Queue:
        with self._lock:
            return self._queues.setdefault((src, dst), queue.Queue())
