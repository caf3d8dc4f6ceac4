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

import numpy as np
import torch

from collafuse_hpc.config import Config
from collafuse_hpc.data import to_uint8
from collafuse_hpc.results.schema import AUDIT, HANDOVER, SAMPLES, SUMMARY, part_path
from collafuse_hpc.results.tensorboard import ScalarSink
from collafuse_hpc.results.writer import RoleResults, save_grid
from collafuse_hpc.roles.client import Client
from collafuse_hpc.roles.server import Server
from collafuse_hpc.runtime.preemption import Preempted
from collafuse_hpc.runtime.profiling import RoundProfiler
from collafuse_hpc.runtime.rounds import Context, end_of_round, restore, rounds
from collafuse_hpc.runtime.topology import Topology, participants
from collafuse_hpc.runtime.wire import Kind, Message, PeerFailure, Wire

log = logging.getLogger("collafuse_hpc")


class RankFailure(RuntimeError):
    """This rank failed; the message names the rank, its role and the cause."""


def _add_totals(totals: dict, row: dict, recent: deque) -> None:
    """Sum a round's timers and byte counts into the run's totals; ``recent`` keeps the
    rows of the last logged window."""
    for key, value in row.items():
        if key.startswith(("time_", "bytes_")):
            totals[key] = totals.get(key, 0) + value
    totals["rounds_run"] = totals.get("rounds_run", 0) + 1
    recent.append(row)


def _loss_tails(totals: dict, recent: deque) -> None:
    """At the end: each loss averaged over the last logged window (``<loss>_recent``)."""
    totals["loss_window"] = len(recent)
    for key in recent[0] if recent else ():
        if key.startswith("loss_"):
            values = [r[key] for r in recent if not math.isnan(r[key])]
            totals[f"{key}_recent"] = float(np.mean(values)) if values else math.nan


def _role_name(ctx: Context) -> str:
    """``server`` (``server_<rank>`` with replicas) or ``client_<id>``: names the
    role's profile trace and TensorBoard folder."""
    if not ctx.topo.is_server(ctx.rank):
        return f"client_{ctx.topo.client_ids[ctx.topo.client_index(ctx.rank)]}"
    return f"server_{ctx.rank}" if ctx.topo.num_servers > 1 else "server"


def _profiler(ctx: Context, device: torch.device) -> RoundProfiler:
    path = os.path.join(ctx.output_dir, "profile", f"{_role_name(ctx)}.json")
    return RoundProfiler(path, ctx.cfg.run.profile_rounds if ctx.may_profile else 0, device.type == "cuda")


def server_loop(ctx: Context, server: Server, results: RoleResults) -> dict:
    """Receive every client's x_c, reply with the loss after the forward pass, step;
    then serve the sampling requests."""
    ranks = {k: ctx.topo.client_rank(k) for k in server.clients}
    wire, run = ctx.wire, ctx.cfg.run
    totals = {"images": 0, "bytes_received": 0, "time_recv_s": 0.0, "time_compute_s": 0.0, "time_send_s": 0.0}
    recent: deque = deque(maxlen=run.log_every)
    profiler = _profiler(ctx, server.device)
    for r in rounds(ctx):
        t0 = time.perf_counter()
        bound = run.work_timeout_s if r == ctx.start_round else None  # the first round starts models (compile, ...)
        taking_part = participants(ctx.cfg, r)
        msgs = {k: wire.recv(ranks[k], Kind.TRAIN, r, bound) for k in server.clients if k in taking_part}
        t1 = time.perf_counter()
        losses: list[float] = []

        def reply(k: int, msg: Message, losses=losses) -> None:
            losses.append(msg.payload.item())
            wire.send(ranks[k], msg)

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
            "bytes_received": sum(m.nbytes for m in msgs.values()),
            "time_recv_s": t1 - t0,
            "time_compute_s": t2 - t1,
            "time_send_s": t3 - t2,
            "images_per_s": n / (t3 - t0),
        }
        results.log(row)
        _add_totals(totals, row, recent)
        totals["images"] += n
        if (r + 1) % run.log_every == 0:
            log.info(
                "server %d round %d/%d loss/server %.4f images/s %.1f",
                ctx.rank,
                r + 1,
                run.rounds,
                row["loss_server"],
                row["images_per_s"],
            )
        profiler.step()
        end_of_round(ctx, results, server.state_dict(), r)
    profiler.close()
    _loss_tails(totals, recent)
    t0 = time.perf_counter()
    requests = {k: wire.recv(ranks[k], Kind.SAMPLE_REQUEST, run.rounds) for k in server.clients}
    for k, reply_msg in server.sample(requests, lambda: wire.check_alive(list(ranks.values()))).items():
        wire.send(ranks[k], reply_msg)
    wire.flush()
    totals["time_sampling_s"] = time.perf_counter() - t0
    busy = totals["time_recv_s"] + totals["time_compute_s"] + totals["time_send_s"]
    totals["images_per_s"] = totals["images"] / busy if busy else 0.0
    if server.device.type == "cuda":
        totals["gpu_peak_memory_bytes"] = torch.cuda.max_memory_allocated(server.device)
    return totals


def client_loop(ctx: Context, client: Client, results: RoleResults) -> dict:
    """Send x_c, step locally while the server works, take the reply; then sample."""
    server_rank = ctx.topo.server_of(client.index)
    wire, run = ctx.wire, ctx.cfg.run
    totals = {"images": 0, "time_local_s": 0.0, "time_wait_s": 0.0, "time_round_s": 0.0}
    recent: deque = deque(maxlen=run.log_every)
    profiler = _profiler(ctx, client.device)
    for r in rounds(ctx):
        if client.index not in participants(ctx.cfg, r):  # not drawn for this round: nothing to do
            idle = {"time_local_s": 0.0, "time_wait_s": 0.0, "time_round_s": 0.0, "images_per_s": 0.0}
            results.log({"round": r, "took_part": 0, "loss_local": math.nan, "loss_server": math.nan, **idle})
            profiler.step()
            end_of_round(ctx, results, client.state_dict(), r)
            continue
        t0 = time.perf_counter()
        msg = client.begin_round(r)
        if msg is not None:
            wire.send(server_rank, msg)
        t1 = time.perf_counter()
        loss_local = client.local_step()
        t2 = time.perf_counter()
        loss_server = math.nan
        if msg is not None:
            bound = run.work_timeout_s if r == ctx.start_round else None  # the first round starts models
            loss_server = wire.recv(server_rank, Kind.TRAIN_REPLY, r, bound).payload.item()
            wire.flush()
        t3 = time.perf_counter()
        row = {
            "round": r,
            "took_part": 1,
            "loss_local": math.nan if loss_local is None else loss_local,
            "loss_server": loss_server,
            "time_local_s": t2 - t1,
            "time_wait_s": t3 - t2,
            "time_round_s": t3 - t0,
            "images_per_s": client.batch_size / (t3 - t0),
        }
        results.log(row)
        _log_audit(results, client)
        _add_totals(totals, row, recent)
        totals["images"] += client.batch_size
        profiler.step()
        end_of_round(ctx, results, client.state_dict(), r)
    profiler.close()
    _loss_tails(totals, recent)
    n = run.samples_per_client
    t0 = time.perf_counter()
    request = client.sample_request(run.rounds, n)
    x_h = None
    if request is not None:
        wire.send(server_rank, request)
        x_h = wire.recv(server_rank, Kind.SAMPLE_REPLY, run.rounds, run.work_timeout_s).payload  # the server samples
        wire.flush()
    t1 = time.perf_counter()
    samples = to_uint8(client.finish_samples(n, x_h))
    totals["time_sampling_wait_s"] = t1 - t0
    totals["time_sampling_local_s"] = time.perf_counter() - t1
    results.write(SAMPLES, samples, units="uint8 pixels 0..255")
    if x_h is not None:
        results.write(HANDOVER, x_h.float().cpu().numpy(), t=client.cut.handover, units="model range [-1, 1]")
    grid = os.path.join(ctx.output_dir, "samples", f"{client.id}.png")
    os.makedirs(os.path.dirname(grid), exist_ok=True)
    save_grid(samples, grid)
    totals["images_per_s"] = totals["images"] / totals["time_round_s"] if totals["time_round_s"] else 0.0
    _log_audit(results, client)
    results.flush()
    audit = {**client.released, "t_c": client.cut.t_c}  # over every run of this output folder
    results.write_attrs(AUDIT, audit)
    totals.update(audit, grid=grid)
    return totals


def _log_audit(results: RoleResults, client: Client) -> None:
    for entry in client.drain_audit():
        results.log(dataclasses.asdict(entry), AUDIT)


def build_role(cfg: Config, topo: Topology, rank: int, device: torch.device, wire: Wire) -> Server | Client:
    if topo.is_server(rank):
        reduce = wire.allreduce_servers if topo.num_servers > 1 else None
        return Server(cfg, topo.clients_of(rank), device, reduce)
    return Client(cfg, topo.client_index(rank), device)


def run_role(ctx: Context, role: Server | Client) -> dict:
    """Run one role to the end. On failure tell the peers (ERROR) and re-raise."""
    cfg, topo, rank = ctx.cfg, ctx.topo, ctx.rank
    if isinstance(role, Server):  # the other replicas first: after a failed collective they are probed first
        peers = [r for r in range(topo.num_servers) if r != rank] + [topo.client_rank(k) for k in role.clients]
        attrs = {"role": "server"}
    else:
        peers = [topo.server_of(role.index)] if role.cut.uses_server else []
        attrs = {"role": "client", "client_id": role.id, "t_c": role.cut.t_c, "cut_ratio": role.cut.ratio}
    attrs.update(rank=rank, host=socket.gethostname(), pid=os.getpid())  # which process wrote this part
    try:
        restore(ctx, role)
        mirror = ScalarSink(ctx.output_dir, _role_name(ctx)) if cfg.run.tensorboard else None
        results = RoleResults(part_file(cfg, topo, rank), attrs, ctx.start_round if ctx.start_round else None, mirror)
        if isinstance(role, Server):
            summary = server_loop(ctx, role, results)
        else:
            summary = client_loop(ctx, role, results)
        results.flush()
        results.write_attrs(SUMMARY, summary)
        ctx.wire.barrier(ctx.cfg.run.work_timeout_s)  # every role has written its part (clients sample at their pace)
        return summary
    except Preempted:
        raise
    except PeerFailure as e:
        if e.unnamed:  # a collective failed without saying who: ask the peers
            known = (ctx.wire.probe(p, timeout_s=5.0) for p in peers)
            text = next((t for t in known if t), None)
            if text:
                e = PeerFailure(text)
        ctx.wire.send_error(peers, ctx.round, str(e))
        raise e from None
    except Exception as e:
        text = f"{topo.describe(rank)}: {type(e).__name__}: {e}"
        ctx.wire.send_error(peers, ctx.round, text)
        raise RankFailure(text) from e


def part_file(cfg: Config, topo: Topology, rank: int) -> str:
    """The part file ``rank`` writes."""
    if topo.is_server(rank):
        return part_path(cfg.run.output_dir, None, rank)
    return part_path(cfg.run.output_dir, topo.client_ids[topo.client_index(rank)])
