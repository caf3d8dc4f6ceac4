"""The role loops of the federated method (roles/federated.py), flat and top to
bottom like the split method's in loops.py, whose round machinery, packing and
end-of-run writing they share.

Per round the server sends theta_r to the round's participants (one message per
client rank, one part per client) and waits for their updates; each client rank
starts its participants from theta_r, steps them E times in batched passes and
sends their updates. After the last round the server sends every client the
global model to sample with.
"""

from __future__ import annotations

import logging
import math
import time

from collafuse_hpc.data import to_uint8
from collafuse_hpc.results.writer import RoleResults
from collafuse_hpc.roles.federated import FedHost, FedServer
from collafuse_hpc.runtime.loops import (
    Recent,
    add_totals,
    client_start,
    finish_client,
    hosts_of,
    invocation_released,
    log_audit,
    round_profiler,
    send_packed,
    wire_bytes,
)
from collafuse_hpc.runtime.rounds import Context, end_of_round, log_clients, log_due, rounds
from collafuse_hpc.runtime.topology import participants
from collafuse_hpc.runtime.wire import Kind

log = logging.getLogger("collafuse_hpc")


def fed_server_loop(ctx: Context, server: FedServer, results: RoleResults) -> dict:
    """Send theta_r, receive the updates, average; then send the final global model."""
    hosts = hosts_of(ctx.topo, server.clients)
    rank_of = {k: ctx.topo.rank_of(k) for k in server.clients}
    wire, run, f = ctx.wire, ctx.cfg.run, ctx.cfg.federated
    totals = {"images": 0, "updates": 0, "bytes_received": 0, "bytes_sent": 0}
    totals.update(time_recv_s=0.0, time_compute_s=0.0, time_send_s=0.0)
    recent = Recent(run.rounds - ctx.start_round)
    ctx.so_far = lambda: {None: recent.added(totals)}
    profiler = round_profiler(ctx, server.device)
    for r in rounds(ctx):
        t0 = time.perf_counter()
        taking = sorted(participants(ctx.cfg, r))
        out = {k: server.message(Kind.WEIGHTS, r, k, server.theta) for k in taking}
        send_packed(wire, out, rank_of)
        t1 = time.perf_counter()
        updates = {}
        for src, ks in hosts.items():  # the local steps run meanwhile
            expected = [k for k in ks if k in out]
            if expected:
                # the peer is known to be working: E local steps of a whole model may take longer than
                # run.timeout_s (a dead peer is still seen at once, a hung one by its watchdog)
                updates.update(wire.split(src, wire.recv(src, Kind.UPDATE, r, run.work_timeout_s), expected))
        wire.flush()
        t2 = time.perf_counter()
        norm = server.aggregate({k: m.payload for k, m in updates.items()})
        t3 = time.perf_counter()
        images = sum(f.local_steps * ctx.cfg.clients[k].batch_size for k in taking)
        row = {
            "round": r,
            "clients": len(updates),
            "update_norm": norm,
            "bytes_received": wire_bytes(updates),
            "bytes_sent": wire_bytes(out),
            "time_send_s": t1 - t0,
            "time_recv_s": t2 - t1,  # the participants' local steps
            "time_compute_s": t3 - t2,
        }  # no images/s: the server denoises no image (the rate would be its clients')
        results.log(row)
        recent.add(row)
        add_totals(totals, row)
        totals["images"] += images
        totals["updates"] += len(updates)
        if log_due(ctx, r):
            log.info("server round %d/%d: %d updates, |mean update| %.3g", r + 1, run.rounds, len(updates), norm)
        profiler.step()
        end_of_round(ctx, [results], server.state_dict, r)
    profiler.close()
    recent.into(totals)
    t0 = time.perf_counter()
    send_packed(wire, {k: server.message(Kind.MODEL, run.rounds, k, server.ema) for k in server.clients}, rank_of)
    wire.flush()
    totals.update(time_sampling_s=time.perf_counter() - t0, images_sampled=0)
    return totals


def fed_client_loop(ctx: Context, host: FedHost, results: dict[int, RoleResults]) -> dict[int, dict]:
    """For this round's clients of the rank: take theta_r, step E times, send the
    updates; then take the global model, fine-tune (F > 0) and sample. Returns each
    client's summary by index."""
    wire, run, f = ctx.wire, ctx.cfg.run, ctx.cfg.federated
    server = 0  # one server (config_rules)
    totals, recent, released, profiler = client_start(ctx, host, results)
    newest: dict[str, float] = {}  # each client's newest local loss, for the log
    for r in rounds(ctx):
        drawn = participants(ctx.cfg, r)
        taking = [c for c in host.clients if c.index in drawn]
        t0 = time.perf_counter()
        received, losses, sent = {}, {}, {}
        if taking:
            # theta_r comes when the slowest participant of the round before has sent its update: work too
            weights = wire.recv(server, Kind.WEIGHTS, r, run.work_timeout_s)
            received = wire.split(server, weights, [c.index for c in taking])
            start = {k: m.payload for k, m in received.items()}
            host.start_round(start)
            t1 = time.perf_counter()
            losses = host.train(taking, r, f.local_steps)
            t2 = time.perf_counter()
            sent = {c.index: host.update(c, r, start[c.index]) for c in taking}
            send_packed(wire, sent, {k: server for k in sent})
            wire.flush()
        else:
            t1 = t2 = t0
        t3 = time.perf_counter()
        for c in host.clients:
            if c.index not in drawn:
                row = {"round": r, "took_part": 0, "loss_local": math.nan, "bytes_sent": 0, "bytes_received": 0}
                row.update(time_local_s=0.0, time_wait_s=0.0, time_round_s=0.0, images_per_s=0.0)
                results[c.index].log(row)
                recent[c.index].add({"loss_local": math.nan})
                continue
            images = f.local_steps * c.batch_size
            row = {
                "round": r,
                "took_part": 1,
                "loss_local": losses[c.index],
                "bytes_sent": sent[c.index].nbytes,
                "bytes_received": received[c.index].nbytes,
                "time_local_s": t2 - t1,  # the rank's batched steps, shared by its clients of the round
                "time_wait_s": (t1 - t0) + (t3 - t2),
                "time_round_s": t3 - t0,
                "images_per_s": images / (t3 - t0),
            }
            results[c.index].log(row)
            log_audit(results[c.index], c)
            recent[c.index].add(row)
            add_totals(totals[c.index], row)
            totals[c.index]["images"] += images
            newest[c.id] = losses[c.index]
        if log_due(ctx, r):
            log_clients(ctx, r, newest)
        profiler.step()
        end_of_round(ctx, list(results.values()), host.state_dict, r)
    profiler.close()
    t0 = time.perf_counter()
    model = wire.split(server, wire.recv(server, Kind.MODEL, run.rounds, run.work_timeout_s), _indices(host))
    t1 = time.perf_counter()
    n = run.samples_per_client
    for c in host.clients:
        c.sample_request(run.rounds, n)  # draws the samples' labels; at c = 1 it sends nothing
    weights = next(iter(model.values())).payload  # one global model, sent to each client
    host.personalize(weights, 0)
    global_samples = host.finish_samples(n, dict.fromkeys(_indices(host)))
    samples = global_samples
    if f.finetune_steps:
        host.personalize(weights, f.finetune_steps)
        samples = host.finish_samples(n, dict.fromkeys(_indices(host)))
    t2 = time.perf_counter()
    for c in host.clients:
        recent[c.index].into(totals[c.index])
        extra = {"images_global": to_uint8(global_samples[c.index])} if f.finetune_steps else {}
        with ctx.stop.writing():
            finish_client(ctx, c, results[c.index], totals[c.index], to_uint8(samples[c.index]), None, extra)
        totals[c.index].update(time_sampling_wait_s=t1 - t0, time_sampling_local_s=t2 - t1)
        totals[c.index]["bytes_received_model"] = model[c.index].nbytes
        totals[c.index].update(invocation_released(c, released[c.index]))
    return totals


def _indices(host: FedHost) -> list[int]:
    return [c.index for c in host.clients]
