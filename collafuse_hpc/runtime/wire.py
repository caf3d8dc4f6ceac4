"""The wire protocol: typed point-to-point messages between a client rank and a
server, and the interface every transport implements.

Every message is a fixed header, int64 [HEADER_LEN]::

    [MAGIC, kind, round, count, C, H, W, dtype code, parts, sender rank, has labels]

then, when ``parts`` > 0, the parts table int64 [parts, PART_LEN]: one row
(client index, t_c, count, has labels) per client whose data the message
carries (a client rank hosting several clients sends one message per server
and round for all of them); then the payload when its dtype code is not 0:
float [count, C, H, W] for images (the parts' images one after the other),
float32 [count] for losses (one per part) and for a federated model's flat weights
(P per part), uint8 [count] (UTF-8 text) for
errors; then int64 labels of the parts that opted in to sharing labels, one
after the other. :func:`pack` and :func:`unpack` turn one client's messages into
a rank's and back. Sends and receives are posted in a fixed order (NCCL has no
tags and no receive from any source), and every wait is bounded by the process
group's timeout. A failing rank sends ERROR to its peers; a receiver turns
ERROR, a closed connection or a timeout into :class:`PeerFailure` naming the peer.

Transports: :mod:`.dist_wire` (torch.distributed between processes, the only
module that calls it) and :mod:`.local_wire` (threads of one process).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

MAGIC = 0x43465553  # "CFUS"
HEADER_LEN = 11
PART_LEN = 4
DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.uint8}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config names

log = logging.getLogger("collafuse_hpc")


class Kind(enum.IntEnum):
    """What a message carries, per client part."""

    TRAIN = 1  # client -> server: x_c [B, C, H, W] of one round (+ labels [B] if shared)
    TRAIN_REPLY = 2  # server -> client: server loss on that client's x_c, float32 [1] (part count 1)
    SAMPLE_REQUEST = 3  # client -> server: count = n samples wanted (+ labels [n] if shared)
    SAMPLE_REPLY = 4  # server -> client: x_h at the hand-over step [n, C, H, W]
    WEIGHTS = 5  # server -> client (federated): the global weights theta_r of the round, float32 [P] (count P)
    UPDATE = 6  # client -> server (federated): theta_k - theta_r after its local steps, then n_k: float32 [P + 1]
    MODEL = 7  # server -> client (federated), after training: the global model to sample with, float32 [P]
    ERROR = 9  # either way: the sender failed; payload is the reason (UTF-8)


class PeerFailure(RuntimeError):
    """A peer failed, vanished or timed out; the message names it when it can be
    known (``unnamed`` is True after a failed collective, which does not say who)."""

    def __init__(self, text: str, unnamed: bool = False):
        super().__init__(text)
        self.unnamed = unnamed


@dataclass(frozen=True)
class Part:
    """One client's share of a message: a row of the parts table."""

    client: int  # index into cfg.clients
    t_c: int
    count: int  # images (or values) of this client; n requested for SAMPLE_REQUEST
    labels: bool = False  # its labels follow (only when the client shares labels)


@dataclass
class Message:
    kind: Kind
    round: int
    parts: tuple[Part, ...] = ()  # the clients it carries (none for ERROR)
    count: int = 0  # images (or values) in the payload: the parts' sum; bytes for ERROR
    payload: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # int64, the labels of the parts with ``labels``

    @property
    def t_c(self) -> int:
        """The cut of a one-client message."""
        assert len(self.parts) == 1, self.parts
        return self.parts[0].t_c

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: header, parts table, payload and labels."""
        tensors = [t for t in (self.payload, self.labels) if t is not None]
        table = len(self.parts) * PART_LEN * 8
        return HEADER_LEN * 8 + table + sum(t.numel() * t.element_size() for t in tensors)


def one_client(
    kind: Kind,
    round_: int,
    client: int,
    t_c: int,
    count: int,
    payload: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Message:
    """A message for one client (what :func:`pack` joins and :func:`unpack` returns)."""
    return Message(kind, round_, (Part(client, t_c, count, labels is not None),), count, payload, labels)


def pack(msgs: list[Message]) -> Message:
    """One message carrying the one-client messages ``msgs`` (same kind and round)."""
    assert msgs and all(m.kind == msgs[0].kind and m.round == msgs[0].round for m in msgs)
    assert len({m.payload.dtype for m in msgs if m.payload is not None}) <= 1, "one wire dtype per message"
    if len(msgs) == 1:
        return msgs[0]
    payloads = [m.payload for m in msgs if m.payload is not None]
    labels = [m.labels for m in msgs if m.labels is not None]
    return Message(
        msgs[0].kind,
        msgs[0].round,
        tuple(p for m in msgs for p in m.parts),
        sum(m.count for m in msgs),
        torch.cat(payloads) if payloads else None,
        torch.cat(labels) if labels else None,
    )


def unpack(msg: Message) -> dict[int, Message]:
    """{client index: its one-client message} of ``msg``. ValueError when the table
    does not add up to the payload and labels."""
    sizes = [p.count for p in msg.parts]
    rows = 0 if msg.payload is None else len(msg.payload)
    n_labels = 0 if msg.labels is None else len(msg.labels)
    labelled = [p.count if p.labels else 0 for p in msg.parts]
    if sum(sizes) != msg.count or (msg.payload is not None and rows != msg.count) or n_labels != sum(labelled):
        raise ValueError(f"the parts table {msg.parts} does not match {rows} payload rows and {n_labels} labels")
    payloads = [None] * len(sizes) if msg.payload is None else msg.payload.split(sizes)
    labels = msg.labels.split(labelled) if msg.labels is not None else [None] * len(sizes)
    out = {}
    for part, payload, y in zip(msg.parts, payloads, labels):
        out[part.client] = Message(msg.kind, msg.round, (part,), part.count, payload, y if part.labels else None)
    return out


def error_message(round_: int, text: str) -> Message:
    data = torch.frombuffer(bytearray(text.encode()[:4096] or b"?"), dtype=torch.uint8)
    return Message(Kind.ERROR, round_, count=data.numel(), payload=data)


def encode_header(msg: Message, sender: int) -> torch.Tensor:
    """The header of ``msg`` sent by rank ``sender``: int64 [HEADER_LEN]."""
    payload = msg.payload
    shape = (0, 0, 0) if payload is None or payload.ndim < 4 else tuple(payload.shape[1:])
    dtype = 0 if payload is None else DTYPE_CODES[payload.dtype]
    fields = [MAGIC, int(msg.kind), msg.round, msg.count, *shape, dtype, len(msg.parts), sender, msg.labels is not None]
    return torch.tensor(fields, dtype=torch.int64)


def encode_parts(msg: Message) -> torch.Tensor:
    """The parts table of ``msg``: int64 [parts, PART_LEN]."""
    return torch.tensor([[p.client, p.t_c, p.count, p.labels] for p in msg.parts], dtype=torch.int64)


def decode_parts(table: torch.Tensor) -> tuple[Part, ...]:
    return tuple(Part(c, t_c, n, bool(y)) for c, t_c, n, y in table.tolist())


@dataclass(frozen=True)
class Header:
    """A decoded header: the message without its tensors, and how to receive them."""

    kind: Kind
    round: int
    parts: int  # rows of the parts table that follows
    count: int
    payload_shape: tuple[int, ...] | None  # None: no payload follows
    payload_dtype: torch.dtype | None
    has_labels: bool


def decode_header(header: torch.Tensor, src: int) -> Header | None:
    """Decode an int64 [HEADER_LEN] header from rank ``src``; None when it is malformed."""
    magic, kind, round_, count, c, h, w, dtype, parts, sender, has_labels = header.tolist()
    if magic != MAGIC or sender != src or kind not in Kind._value2member_map_ or dtype not in (0, *DTYPES) or parts < 0:
        return None
    shape = None if not dtype else ((count, c, h, w) if c else (count,))
    return Header(Kind(kind), round_, parts, count, shape, DTYPES.get(dtype), bool(has_labels))


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
        """Best effort: tell ``peers`` that this rank failed, waiting at most a few seconds.
        A peer that cannot be told is gone already (it sees this rank's failure as a closed
        connection); this rank is failing with ``text`` either way, so that is logged, not raised."""
        for p in peers:
            try:
                self.send(p, error_message(round_, text))
            except RuntimeError as e:
                log.warning("could not tell %s of this failure: %s", self.describe(p), str(e).splitlines()[0][:200])
        try:
            self.flush(timeout_s=5.0)
        except RuntimeError as e:
            log.warning("the failure notices were not all delivered: %s", str(e).splitlines()[0][:200])

    def split(self, src: int, msg: Message, clients: list[int]) -> dict[int, Message]:
        """{client: its one-client message} of ``msg`` from ``src``, which must carry
        exactly ``clients``; PeerFailure (a protocol error) otherwise."""
        try:
            parts = unpack(msg)
        except ValueError as e:
            raise PeerFailure(f"protocol error: {self.describe(src)} sent a malformed {msg.kind.name}: {e}") from None
        if sorted(parts) != sorted(clients) or len(parts) != len(msg.parts):
            raise PeerFailure(
                f"protocol error: {self.describe(self.rank)} expected {msg.kind.name} of round {msg.round} for "
                f"clients {sorted(clients)} from {self.describe(src)}, got clients {[p.client for p in msg.parts]}"
            )
        return parts

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
