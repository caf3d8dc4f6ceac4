"""In-process transport: every role in a thread of one process (``--in-process``,
the equivalence tests)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from collafuse_hpc.runtime.wire import Kind, Message, PeerFailure, Wire


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
        self.hub.queue(self.rank, dst).put(Message(msg.kind, msg.round, msg.parts, msg.count, payload, labels))

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
        return self._check(src, Message(msg.kind, msg.round, msg.parts, msg.count, payload, labels), kind, round_)

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
