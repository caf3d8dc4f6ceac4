"""The wire protocol: typed point-to-point messages between a client and its
server, and the interface every transport implements.

Every message is a fixed header, int64 [HEADER_LEN]::

    [MAGIC, kind, round, count, C, H, W, dtype code, t_c, sender rank, has labels]

followed by the payload when its dtype code is not 0: float [count, C, H, W]
for images, float32 [count] for losses, uint8 [count] (UTF-8 text) for errors;
then, only for clients that opted in to sharing labels, int64 [count] labels. Sends and
receives are posted in a fixed order (NCCL has no tags and no receive from any
source), and every wait is bounded by the process group's timeout. A failing
rank sends ERROR to its peers; a receiver turns ERROR, a closed connection or
a timeout into :class:`PeerFailure` naming the peer.

Transports: :mod:`.dist_wire` (torch.distributed between processes, the only
module that calls it) and :mod:`.local_wire` (threads of one process).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

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


def encode_header(msg: Message, sender: int) -> torch.Tensor:
    """The header of ``msg`` sent by rank ``sender``: int64 [HEADER_LEN]."""
    payload = msg.payload
    shape = (0, 0, 0) if payload is None or payload.ndim < 4 else tuple(payload.shape[1:])
    dtype = 0 if payload is None else DTYPE_CODES[payload.dtype]
    fields = [MAGIC, int(msg.kind), msg.round, msg.count, *shape, dtype, msg.t_c, sender, msg.labels is not None]
    return torch.tensor(fields, dtype=torch.int64)


@dataclass(frozen=True)
class Header:
    """A decoded header: the message without its tensors, and how to receive them."""

    kind: Kind
    round: int
    t_c: int
    count: int
    payload_shape: tuple[int, ...] | None  # None: no payload follows
    payload_dtype: torch.dtype | None
    has_labels: bool


def decode_header(header: torch.Tensor, src: int) -> Header | None:
    """Decode an int64 [HEADER_LEN] header from rank ``src``; None when it is malformed."""
    magic, kind, round_, count, c, h, w, dtype, t_c, sender, has_labels = header.tolist()
    if magic != MAGIC or sender != src or kind not in Kind._value2member_map_ or dtype not in (0, *DTYPES):
        return None
    shape = None if not dtype else ((count, c, h, w) if c else (count,))
    return Header(Kind(kind), round_, t_c, count, shape, DTYPES.get(dtype), bool(has_labels))


class Wire:
    """What a role's loop needs from a transport (DistWire, LocalWire)."""

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
