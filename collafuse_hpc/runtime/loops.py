"""The role loops: what a server and a client do each round, flat and top to
bottom, and the failure protocol around them (runtime/rounds.py holds what
surrounds every round). The same loops run over either transport (runtime/run.py
picks one).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from collafuse_hpc.config import Config
from collafuse_hpc.data import to_uint8
from collafuse_hpc.logs import Heartbeat
from collafuse_hpc.results.schema import AUDIT, part_path, recent_mean, recent_rows
from collafuse_hpc.results.tensorboard import ScalarSink
from collafuse_hpc.results.writer import RoleResults, save_grid
from collafuse_hpc.roles.client import Client
from collafuse_hpc.roles.host import ClientHost
from collafuse_hpc.roles.server import Server
from collafuse_hpc.runtime.preemption import Preempted
from collafuse_hpc.runtime.profiling import RoundProfiler
from collafuse_hpc.runtime.rounds import Context, end_of_round, log_clients, log_due, restore, rounds, slow_write
from collafuse_hpc.runtime.topology import Topology, participants
from collafuse_hpc.runtime.wire import Kind, Message, PeerFailure, Wire, pack

log = logging.getLogger("collafuse_hpc")


class RankFailure(RuntimeError):
    """This rank failed; the message names the rank, its role and the cause."""


def add_totals(totals: dict, row: dict) -> None:
    """Sum a round's timers and byte counts into the run's totals."""
    for key, value in row.items():
        if key.startswith(("time_", "bytes_")):
            totals[key] = totals.get(key, 0) + value
    totals["rounds_run"] = totals.get("rounds_run", 0) + 1


class Recent:
    """The last rows a role's results got in this invocation, enough for its recent loss
    (schema.recent_rows of the rows it will have at most: ``planned``)."""

    def __init__(self, planned: int):
        self.rows: deque = deque(maxlen=recent_rows(planned))
        self.count = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1

    def added(self, totals: dict) -> dict:
        """A copy of ``totals`` with :meth:`into`'s figures (what a stop writes)."""
        out = dict(totals)
        self.into(out)
        return out

    def into(self, totals: dict) -> None:
        """At the end: each loss's recent mean (``<loss>_recent``) and how many of this
        invocation's rows it is over (``loss_window`` of ``loss_rows``), as inspect says it."""
        tail = list(self.rows)[-recent_rows(self.count) :] if self.count else []
        totals.update(loss_window=len(tail), loss_rows=self.count)
        for key in tail[0] if tail else ():
            if key.startswith("loss_"):
                totals[f"{key}_recent"] = recent_mean([r[key] for r in tail])


def _role_name(ctx: Context) -> str:
    """``server`` (``server_<rank>`` with replicas), ``client_<id>`` or, for a rank hosting
    several clients, ``clients_rank<rank>``: names the rank's profile trace."""
    if ctx.topo.is_server(ctx.rank):
        return f"server_{ctx.rank}" if ctx.topo.num_servers > 1 else "server"
    hosted = ctx.topo.clients_on(ctx.rank)
    return f"client_{ctx.topo.client_ids[hosted[0]]}" if len(hosted) == 1 else f"clients_rank{ctx.rank}"


def round_profiler(ctx: Context, device: torch.device) -> RoundProfiler:
    """The rank's profiler of ``run.profile_rounds`` rounds (none when this thread may not profile)."""
    path = os.path.join(ctx.output_dir, "profile", f"{_role_name(ctx)}.json")
    return RoundProfiler(path, ctx.cfg.run.profile_rounds if ctx.may_profile else 0, device.type == "cuda")


def hosts_of(topo: Topology, clients: list[int]) -> dict[int, list[int]]:
    """``clients`` by the rank that hosts them: {client rank: [client index, ...]}."""
    out: dict[int, list[int]] = {}
    for k in clients:
        out.setdefault(topo.rank_of(k), []).append(k)
    return out


def wire_bytes(msgs: dict[int, Message]) -> int:
    """Bytes of the one-client messages ``msgs`` ``{client: msg}``, each as if sent alone
    (header, its row of the parts table, its tensors): how a client counts its own messages,
    and a server the sum of its clients', whichever messages a rank packs them into."""
    return sum(m.nbytes for m in msgs.values())


def send_packed(wire: Wire, msgs: dict[int, Message], dst_of: dict[int, int]) -> None:
    """Send one-client messages ``{client: msg}`` packed: one message per destination rank."""
    for dst, ks in sorted(_group(msgs, dst_of).items()):
        wire.send(dst, pack([msgs[k] for k in ks]))


def _group(msgs: dict[int, Message], dst_of: dict[int, int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for k in sorted(msgs):
        out.setdefault(dst_of[k], []).append(k)
    return out


def server_loop(ctx: Context, server: Server, results: RoleResults) -> dict:
    """Receive every client rank's x_c, reply with the losses after the forward pass,
    step; then serve the sampling requests."""
    hosts = hosts_of(ctx.topo, server.clients)
    rank_of = {k: ctx.topo.rank_of(k) for k in server.clients}
    wire, run = ctx.wire, ctx.cfg.run
    totals = {"images": 0, "bytes_received": 0, "bytes_sent": 0}
    totals.update(time_recv_s=0.0, time_compute_s=0.0, time_send_s=0.0)
    recent = Recent(run.rounds - ctx.start_round)
    ctx.so_far = lambda: {None: recent.added(totals)}
    profiler = round_profiler(ctx, server.device)
    if not hosts:
        log.info("server %d: every client it serves is local-only (c = 1); it stays idle until sampling", ctx.rank)
    trained_since_log, last_row = 0, {}
    for r in rounds(ctx):
        t0 = time.perf_counter()
        bound = run.work_timeout_s if r == ctx.start_round else None  # the first round starts models (compile, ...)
        taking_part = participants(ctx.cfg, r)
        msgs = {}
        for src, ks in hosts.items():
            expected = [k for k in ks if k in taking_part]
            if expected:
                msgs.update(wire.split(src, wire.recv(src, Kind.TRAIN, r, bound), expected))
        t1 = time.perf_counter()
        losses: list[float] = []
        pending: dict[int, dict[int, Message]] = {src: {} for src in hosts}
        expecting = {src: sum(1 for k in ks if k in msgs) for src, ks in hosts.items()}

        def reply(k: int, msg: Message, losses=losses, pending=pending, expecting=expecting) -> None:
            losses.append(msg.payload.item())
            waiting = pending[rank_of[k]]
            waiting[k] = msg
            if len(waiting) == expecting[rank_of[k]]:  # that rank's last reply: send them together
                wire.send(rank_of[k], pack([waiting[j] for j in sorted(waiting)]))

        if msgs or ctx.topo.num_servers > 1:  # an idle replica still joins the gradient all-reduce
            server.train_round(msgs, reply, taking_part)
        t2 = time.perf_counter()
        wire.flush()
        t3 = time.perf_counter()
        n = sum(m.count for m in msgs.values())
        row = {
            "round": r,
            "loss_server": float(np.mean(losses)) if losses else math.nan,
            "clients": len(msgs),
            "bytes_received": wire_bytes(msgs),
            "bytes_sent": wire_bytes({k: m for waiting in pending.values() for k, m in waiting.items()}),
            "time_recv_s": t1 - t0,
            "time_compute_s": t2 - t1,
            "time_send_s": t3 - t2,
            "images_per_s": n / (t3 - t0),
        }
        if msgs:  # a round no client sent to has nothing to record: no NaN rows to filter
            results.log(row)
            recent.add(row)
            trained_since_log, last_row = trained_since_log + 1, row
        add_totals(totals, row)
        totals["images"] += n
        if log_due(ctx, r):
            _log_server_interval(ctx, r, last_row, trained_since_log)
            trained_since_log = 0
        profiler.step()
        end_of_round(ctx, [results], server.state_dict, r)
    profiler.close()
    recent.into(totals)
    t0 = time.perf_counter()
    requests = {}
    for src, ks in hosts.items():
        requests.update(wire.split(src, wire.recv(src, Kind.SAMPLE_REQUEST, run.rounds), ks))
    with Heartbeat(f"server {ctx.rank}") as beat:  # a batch's whole chain counts at once: minutes without a line
        beat.at(f"sampling {sum(m.count for m in requests.values())} images")
        replies = server.sample(requests, lambda: wire.check_alive(list(hosts)))
    send_packed(wire, replies, rank_of)
    wire.flush()
    totals["time_sampling_s"] = time.perf_counter() - t0
    totals["images_sampled"] = sum(m.count for m in requests.values())
    busy = totals["time_recv_s"] + totals["time_compute_s"] + totals["time_send_s"]
    totals["images_per_s"] = totals["images"] / busy if busy else 0.0
    if server.device.type == "cuda":
        totals["gpu_peak_memory_bytes"] = torch.cuda.max_memory_allocated(server.device)
    return totals


def _log_server_interval(ctx: Context, r: int, row: dict, trained: int) -> None:
    """The server's log line every ``run.log_every`` rounds (``row``: its newest recorded
    round); an idle server says so."""
    if not trained:
        log.info("server %d round %d/%d idle: no client sent x_c in this interval", ctx.rank, r + 1, ctx.cfg.run.rounds)
        return
    log.info(
        "server %d round %d/%d loss/server %.4f images/s %.1f",
        ctx.rank,
        r + 1,
        ctx.cfg.run.rounds,
        row["loss_server"],
        row["images_per_s"],
    )


def client_loop(ctx: Context, host: ClientHost, results: dict[int, RoleResults]) -> dict[int, dict]:
    """For this round's clients of the rank: send their x_c (one message per server),
    step them locally in one batched pass while the servers work, take the replies;
    then sample for every client. Returns each client's summary by index."""
    wire, run, topo = ctx.wire, ctx.cfg.run, ctx.topo
    server_of = {c.index: topo.server_of(c.index) for c in host.clients}
    totals, recent, released, profiler = client_start(ctx, host, results)
    newest: dict[str, float] = {}  # each client's newest local loss, for the log
    for r in rounds(ctx):
        drawn = participants(ctx.cfg, r)
        taking = [c for c in host.clients if c.index in drawn]
        t0 = time.perf_counter()
        sent = {c.index: c.begin_round(r) for c in taking}
        sent = {k: m for k, m in sent.items() if m is not None}
        send_packed(wire, sent, server_of)
        t1 = time.perf_counter()
        loss_local = host.local_steps(taking)
        t2 = time.perf_counter()
        loss_server: dict[int, float] = {}
        received: dict[int, int] = {}  # bytes of each client's reply, as if sent alone
        bound = run.work_timeout_s if r == ctx.start_round else None  # the first round starts models
        for src, ks in _group(sent, server_of).items():
            replies = wire.split(src, wire.recv(src, Kind.TRAIN_REPLY, r, bound), ks)
            loss_server.update({k: m.payload.item() for k, m in replies.items()})
            received.update({k: m.nbytes for k, m in replies.items()})
        wire.flush()
        t3 = time.perf_counter()
        for c in host.clients:
            if c.index not in drawn:  # not drawn for this round: nothing to do
                idle = {"time_local_s": 0.0, "time_wait_s": 0.0, "time_round_s": 0.0, "images_per_s": 0.0}
                idle.update(bytes_sent=0, bytes_received=0)
                losses = {"loss_local": math.nan, "loss_server": math.nan}
                results[c.index].log(_columns(c, {"round": r, "took_part": 0, **losses, **idle}))
                recent[c.index].add(losses)
                continue
            local = loss_local[c.index]
            row = {
                "round": r,
                "took_part": 1,
                "loss_local": math.nan if local is None else local,
                "loss_server": loss_server.get(c.index, math.nan),
                "time_local_s": t2 - t1,  # the rank's batched step, shared by its clients of the round
                "time_wait_s": t3 - t2,
                "time_round_s": t3 - t0,
                "images_per_s": c.batch_size / (t3 - t0),
                "bytes_sent": sent[c.index].nbytes if c.index in sent else 0,  # the audit's count of it
                "bytes_received": received.get(c.index, 0),
            }
            results[c.index].log(_columns(c, row))
            log_audit(results[c.index], c)
            recent[c.index].add(row)
            add_totals(totals[c.index], row)
            totals[c.index]["images"] += c.batch_size
            if local is not None:  # c = 0 trains no local model
                newest[c.id] = local
        if log_due(ctx, r):
            log_clients(ctx, r, newest)
        profiler.step()
        end_of_round(ctx, list(results.values()), host.state_dict, r)
    profiler.close()
    n = run.samples_per_client
    t0 = time.perf_counter()
    requests = {c.index: c.sample_request(run.rounds, n) for c in host.clients}
    requests = {k: m for k, m in requests.items() if m is not None}
    send_packed(wire, requests, server_of)
    x_h: dict[int, torch.Tensor | None] = {c.index: None for c in host.clients}
    for src, ks in _group(requests, server_of).items():  # the servers sample
        replies = wire.split(src, wire.recv(src, Kind.SAMPLE_REPLY, run.rounds, run.work_timeout_s), ks)
        x_h.update({k: m.payload for k, m in replies.items()})
    wire.flush()
    t1 = time.perf_counter()
    samples = host.finish_samples(n, x_h)
    t2 = time.perf_counter()
    for c in host.clients:
        recent[c.index].into(totals[c.index])
        with ctx.stop.writing():
            finish_client(ctx, c, results[c.index], totals[c.index], to_uint8(samples[c.index]), x_h[c.index])
        totals[c.index].update(time_sampling_wait_s=t1 - t0, time_sampling_local_s=t2 - t1)
        totals[c.index].update(invocation_released(c, released[c.index]))
    return totals


def invocation_released(client: Any, before: dict) -> dict:
    """What left ``client`` in this invocation (``invocation_<count>``): its counts now
    less ``before``, those at the invocation's start."""
    return {f"invocation_{k}": v - before[k] for k, v in client.released.items()}


def client_start(
    ctx: Context, host: ClientHost, results: dict[int, RoleResults]
) -> tuple[dict[int, dict], dict[int, Recent], dict[int, dict], RoundProfiler]:
    """What a client rank's loop keeps from its start, under either method: each client's
    totals and recent rows, what left it over the run before this invocation (its audit
    counted in: Client.count_audited), and the rank's profiler."""
    zero = {"images": 0, "time_local_s": 0.0, "time_wait_s": 0.0, "time_round_s": 0.0}
    totals = {c.index: dict(zero) for c in host.clients}
    recent = {c.index: Recent(ctx.cfg.run.rounds - ctx.start_round) for c in host.clients}
    for c in host.clients:
        c.count_audited(results[c.index].audit_totals())
    released = {c.index: dict(c.released) for c in host.clients}
    ctx.so_far = lambda: {  # at a stop: what left each client over the run, written as at the end (finish_client)
        c.index: recent[c.index].added(totals[c.index])
        | write_audit(results[c.index], c)
        | invocation_released(c, released[c.index])
        for c in host.clients
    }
    return totals, recent, released, round_profiler(ctx, host.device)


def _columns(client: Client, row: dict) -> dict:
    """A client's row without the columns its cut never fills: a local-only client
    (c = 1) has no server loss."""
    return row if client.cut.uses_server else {k: v for k, v in row.items() if k != "loss_server"}


def finish_client(
    ctx: Context,
    client: Client,
    results: RoleResults,
    totals: dict,
    samples: np.ndarray,
    x_h: torch.Tensor | None,
    more: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a client's samples, grid, audit and totals at the end of its run; ``more``:
    other uint8 image sets of the samples group by name (a federated client's global ones)."""
    d, run = ctx.cfg.diffusion, ctx.cfg.run
    made = {"images": (samples, {"units": "uint8 pixels 0..255"})}
    made.update({name: (images, {"units": "uint8 pixels 0..255"}) for name, images in (more or {}).items()})
    if x_h is not None:
        handover = {"t": client.cut.handover, "units": "model range [-1, 1]"}
        made["x_handover"] = (x_h.float().cpu().numpy(), handover)
    how = {"sampler": d.sampler, "sampling_steps": d.sampling_steps, "eta": d.eta, "seed": run.seed}
    results.write_set(ctx.record, "samples", made, {"record": ctx.record, "checkpoint_round": run.rounds, **how})
    grid = os.path.join(ctx.output_dir, "samples", f"{client.id}.png")  # the newest; each record's in its folder
    for path in (os.path.join(ctx.output_dir, "samples", f"record{ctx.record}", f"{client.id}.png"), grid):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_grid(samples, path)
    totals["images_per_s"] = totals["images"] / totals["time_round_s"] if totals["time_round_s"] else 0.0
    totals.update(write_audit(results, client), grid=grid)


def write_audit(results: RoleResults, client: Client) -> dict:
    """Write what left ``client`` (its rows, and its totals over every run as the audit's
    attributes: count_audited) at the end of an invocation, or at a stop; returns the totals."""
    log_audit(results, client)
    results.flush()
    audit = {**client.released, "t_c": client.cut.t_c, "sent": client.what_leaves()}
    results.write_attrs(AUDIT, audit)
    return audit


def log_audit(results: RoleResults, client: Client) -> None:
    """Append what left ``client`` since the last call to its audit rows."""
    for entry in client.drain_audit():
        results.log(dataclasses.asdict(entry), AUDIT)


def summary_key(cfg: Config, topo: Topology, rank: int, client: int | None = None) -> str:
    """A role's name in the summaries of a run: its part file's name, ``server_<rank>`` or
    ``client_<id>``."""
    return os.path.splitext(os.path.basename(part_file(cfg, topo, rank, client)))[0]


def run_role(ctx: Context, role: Any, loop: Callable) -> dict[str, dict]:
    """Run one rank's role to the end with its method's ``loop`` (methods.py); returns
    each role's summary by :func:`summary_key`. On failure tell the peers (ERROR) and
    re-raise."""
    cfg, topo, rank = ctx.cfg, ctx.topo, ctx.rank
    server = topo.is_server(rank)
    if server:  # the other replicas first: after a failed collective they are probed first
        peers = [r for r in range(topo.num_servers) if r != rank] + sorted(hosts_of(topo, role.clients))
    else:
        peers = role.servers(topo)
    results: dict[int | None, RoleResults] = {}
    try:
        restore(ctx, role)
        results = _open_parts(ctx, role)
        summaries = {None: loop(ctx, role, results[None])} if server else loop(ctx, role, results)
        _write_summaries(ctx, results, summaries)
        ctx.wire.barrier(ctx.cfg.run.work_timeout_s)  # every role has written its part (clients sample at their pace)
        return {summary_key(cfg, topo, rank, k): summary for k, summary in summaries.items()}
    except Preempted:
        if ctx.so_far is not None and ctx.trains:  # the rounds it trained count in the run's summary
            try:
                with ctx.stop.writing():  # so_far writes a client's audit totals too
                    _write_summaries(ctx, results, ctx.so_far())
            except Exception as e:  # noqa: BLE001 - the set is complete: the stop (exit 75) matters more
                log.warning("%s: could not write what it trained before the stop: %s", topo.describe(rank), e)
            ctx.wire.barrier(ctx.cfg.run.work_timeout_s)  # every rank stopped at the same round: rank 0 reads them
        raise
    except PeerFailure as e:
        if e.unnamed:  # a collective failed without saying who: ask the peers
            known = (ctx.wire.probe(p, timeout_s=5.0) for p in peers)
            text = next((t for t in known if t), None)
            if text:
                e = PeerFailure(text)
        ctx.wire.send_error(peers, ctx.round, str(e))
        _keep_rows(ctx, role, results)
        raise e from None
    except Exception as e:
        text = f"{topo.describe(rank)}: {type(e).__name__}: {e}"
        ctx.wire.send_error(peers, ctx.round, text)
        _keep_rows(ctx, role, results)
        raise RankFailure(text) from e


def _write_summaries(ctx: Context, results: dict[int | None, RoleResults], summaries: dict) -> None:
    """Each part's rows and this invocation's summary (``summaries`` by part) into its file."""
    with ctx.stop.writing():
        for k, part in results.items():
            part.flush()
            part.write_summary(ctx.record, summaries[k], ctx.trains)


def _keep_rows(ctx: Context, role: Any, results: dict[int | None, RoleResults]) -> None:
    """A failing rank still writes the rows it logged (finished rounds) and everything that
    left its clients, the unfinished round's releases too: they sit in buffers between
    flushes, and a peer's failure may reach this rank before its next flush. A resume cuts
    the rounds after its set back as usual; the audit is append-only."""
    if None not in results:  # a client rank
        for c in role.clients:
            if c.index in results:
                log_audit(results[c.index], c)
    with ctx.stop.writing():
        for part in results.values():
            try:
                part.flush()
            except Exception as e:  # a full disk, a broken file: never hide the failure being raised
                log.warning("could not write the logged rows of %s: %s: %s", part.path, type(e).__name__, e)


def _open_parts(ctx: Context, role: Any) -> dict[int | None, RoleResults]:
    """The rank's part files by client index (None: the server's), created, or on a resume
    cut back to the rounds before ``ctx.start_round``: under the stop request's write lock,
    so that a stop signal never ends the process inside that HDF5 write."""
    cfg, topo, rank = ctx.cfg, ctx.topo, ctx.rank
    where = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}  # which process wrote a part
    resume = ctx.start_round if ctx.start_round else None
    results = {}
    with ctx.stop.writing():
        slow_write(ctx)
        if topo.is_server(rank):
            mirror = ScalarSink(ctx.output_dir, _role_name(ctx)) if cfg.run.tensorboard else None
            return {None: RoleResults(part_file(cfg, topo, rank), {"role": "server", **where}, resume, mirror)}
        for c in role.clients:
            mirror = ScalarSink(ctx.output_dir, f"client_{c.id}") if cfg.run.tensorboard else None
            attrs = {"role": "client", "client_id": c.id, "t_c": c.cut.t_c, "cut_ratio": c.cut.ratio, **where}
            results[c.index] = RoleResults(part_file(cfg, topo, rank, c.index), attrs, resume, mirror)
    return results


def part_file(cfg: Config, topo: Topology, rank: int, client: int | None = None) -> str:
    """The part file of server ``rank`` or of client index ``client``."""
    if topo.is_server(rank):
        return part_path(cfg.run.output_dir, None, rank)
    return part_path(cfg.run.output_dir, topo.client_ids[client])
