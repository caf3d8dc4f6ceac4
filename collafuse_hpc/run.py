"""The shared loop: rounds, checkpoints, results, sampling, shutdown.

The same role loops run in two transports: one process per rank over
torch.distributed (:func:`run_distributed`), or every role in a thread of one
process (:func:`run_in_process`, for debugging and the equivalence test).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from . import checkpoint
from .client import Client
from .config import Config, cut_step, dump, resume_differences, to_dict
from .data import ShardReader, inspect_shard, to_uint8
from .features import inception_path
from .launch import Launch, discover, init_process_groups, resolve_device, store_client, threads_per_rank
from .lock import RunLock
from .lock import check as check_lock
from .preemption import Preempted, StopRequest
from .profiling import RoundProfiler
from .results import RoleResults, create_index, part_name, record_config, save_grid
from .server import Server
from .topology import Topology
from .unet import UNet
from .watchdog import Heartbeat, Watchdog
from .wire import DistWire, Kind, LocalHub, LocalWire, Message, PeerFailure, Wire

log = logging.getLogger("collafuse_hpc")


class RankFailure(RuntimeError):
    """This rank failed; the message names the rank, its role and the cause."""


@dataclass
class Context:
    """What one role's loop needs besides its role object."""

    cfg: Config
    topo: Topology
    rank: int
    wire: Wire
    start_round: int
    config_yaml: str
    stop: StopRequest
    watchdog: Watchdog | None = None  # distributed runs only
    round: int = 0  # current round, for error reports
    pending_stop: Callable[[], bool] | None = None  # the stop agreement posted at the last check
    may_profile: bool = True  # in-process runs profile from one thread (the profiler is per process)

    @property
    def output_dir(self) -> str:
        return self.cfg.run.output_dir

    def beat(self, what: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(what)


def preflight(cfg: Config, resume: bool | str) -> int:
    """Checks every rank makes before any collective and before any file is written;
    returns the round to start at.

    Args:
        resume: False (a new run), True (continue the newest complete checkpoint set;
            refused without one) or "auto" (continue one if there is one, else start).
    """
    for i, c in enumerate(cfg.clients):
        info = inspect_shard(c.shard)
        want = (cfg.data.channels, cfg.data.image_size)
        if (info.channels, info.image_size) != want:
            raise ValueError(
                f"shard {c.shard!r} (clients.{i}) holds {info.channels}x{info.image_size}x"
                f"{info.image_size} images, but 'data' asks for {want[0]}x{want[1]}x{want[1]}"
            )
        if (c.labels or c.share_labels) and not info.has_labels:
            raise ValueError(f"clients.{i} uses labels, but shard {c.shard!r} has no labels")
        if c.labels or c.share_labels:
            labels = ShardReader(c.shard, "train").labels()
            if labels.min() < 0 or labels.max() >= cfg.data.num_classes:
                raise ValueError(
                    f"clients.{i} uses labels, but shard {c.shard!r} has labels {labels.min()}..{labels.max()}, "
                    f"outside [0, data.num_classes = {cfg.data.num_classes}): set data.num_classes to at least "
                    f"{labels.max() + 1}"
                )
        if c.batch_size > info.counts["train"]:
            raise ValueError(
                f"config key 'clients.{i}.batch_size' is {c.batch_size}, but shard {c.shard!r} holds only "
                f"{info.counts['train']} train images"
            )
    _check_models(cfg)
    if cfg.eval.at_end and cfg.eval.extractor == "inception":
        inception_path(cfg.eval.inception_path)  # a missing file fails now, not after training
    index = os.path.join(cfg.run.output_dir, "results.h5")
    if not resume:
        if os.path.exists(index):
            raise ValueError(
                f"{index!r} holds results of an earlier run; pass --resume to continue it or set "
                "run.output_dir to a new folder"
            )
        return 0
    return _resume_round(cfg, auto=resume == "auto")


def _check_models(cfg: Config) -> None:
    """Build every distinct model on the meta device (no memory, no arithmetic) and run
    one forward pass, so sizes that cannot work fail now, naming their key."""
    size, channels = cfg.data.image_size, cfg.data.channels
    shared = any(c.share_labels for c in cfg.clients)
    # (model, classes, cut conditioning) -> the first key that asks for it, and its ModelConfig
    specs = {
        (repr(cfg.server.model), cfg.data.num_classes + 1 if shared else 0, True): ("server.model", cfg.server.model)
    }
    for i, c in enumerate(cfg.clients):
        specs.setdefault(
            (repr(c.model), cfg.data.num_classes if c.labels else 0, False), (f"clients.{i}.model", c.model)
        )
    for (model, classes, cut), (key, m) in specs.items():
        try:
            with torch.device("meta"):
                t = torch.zeros(1, dtype=torch.long)
                net = UNet(m, channels, size, num_classes=classes, cut_conditioning=cut)
                net(torch.zeros(1, channels, size, size), t, t if cut else None, t if classes else None)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise ValueError(
                f"config key '{key}' ({model}) does not give a working UNet for {channels}x{size}x{size} images: "
                f"{(str(e).splitlines() or [type(e).__name__])[0]} (channel counts base_channels x channel_mult "
                "should be multiples of 4, or of 32 from 128 on; image_size divisible by 2^(levels - 1))"
            ) from None


def _resume_round(cfg: Config, auto: bool) -> int:
    """The newest complete set's round, after checking that this config may continue it."""
    out = cfg.run.output_dir
    rounds = checkpoint.complete_rounds(out)
    if not rounds:
        if auto:
            return 0
        raise ValueError(
            f"--resume: {checkpoint.describe(out)}, so there is nothing to continue. Start without --resume "
            "(a new run.output_dir), or pass --resume=auto to continue when a set exists and start otherwise"
        )
    saved, errors = None, []
    for r in reversed(rounds):  # the newest set whose config reads (a damaged file falls back, as on restore)
        try:
            saved = checkpoint.saved_config(out, r)
            break
        except ValueError as e:
            errors.append(str(e))
    if saved is None:
        raise ValueError(f"--resume: no checkpoint set in {out!r} can be read: {'; '.join(errors)}")
    differences = resume_differences(saved, to_dict(cfg))
    if differences:
        raise ValueError(
            f"--resume: this config differs from the run in {out!r} in keys that change what it trains: "
            f"{'; '.join(differences)}. Resume with the run's config (only rounds, logging, checkpointing, "
            "timeouts, devices, shard paths, sampling steps and eval settings may change), or start a new "
            "run.output_dir"
        )
    if cfg.run.rounds < rounds[-1]:
        raise ValueError(
            f"--resume: the run in {out!r} has finished {rounds[-1]} rounds, but run.rounds is {cfg.run.rounds}; "
            "rounds are never undone: raise run.rounds to train on, or use 'collafuse-hpc sample' to sample again"
        )
    return rounds[-1]


def _fault(ctx: Context, round_: int) -> None:
    f = ctx.cfg.fault
    if f.rank == ctx.rank and f.round == round_:
        if f.mode == "exit":
            os._exit(13)
        raise RuntimeError(f"injected fault at round {round_}")


def _end_of_round(ctx: Context, results: RoleResults, state: dict, r: int) -> None:
    """After round ``r``: agree on a stop request, flush results and write a
    checkpoint set when due; raise Preempted (on every rank) after a stop.

    The agreement is posted at one check and read at the next, so it never
    holds a round up: a signal stops the run one check interval after it came.
    """
    run = ctx.cfg.run
    done = r + 1
    last = done == run.rounds
    check = done % run.stop_check_every == 0
    stop = False
    if (check or last) and ctx.pending_stop is not None:
        stop, ctx.pending_stop = ctx.pending_stop() and not last, None
    if check and not last and not stop:
        ctx.pending_stop = ctx.wire.any_rank_later(ctx.stop.requested)
    if done % run.log_every == 0 or last or stop:
        results.flush()
    if last or stop or (run.checkpoint_every and done % run.checkpoint_every == 0):
        ctx.beat(f"the checkpoint set of round {done}")
        checkpoint.save_rank(ctx.output_dir, done, ctx.rank, state, ctx.config_yaml)
        ctx.wire.barrier(run.work_timeout_s)  # large checkpoints take a while on a slow file system
        if ctx.rank == 0:
            checkpoint.mark_complete(ctx.output_dir, done, run.keep_checkpoints)
        ctx.wire.barrier()
    if stop:
        raise Preempted(done, ctx.stop.signal_name or "a signal on another rank")


def _rounds(ctx: Context):
    """The rounds still to run; keeps ``ctx.round`` current and injects faults."""
    for r in range(ctx.start_round, ctx.cfg.run.rounds):
        ctx.round = r
        ctx.beat(f"round {r}")
        _fault(ctx, r)
        yield r
    ctx.round = ctx.cfg.run.rounds
    ctx.beat("sampling")


def _add_totals(totals: dict, row: dict) -> None:
    """Sum a round's timers and byte counts into the run's totals."""
    for key, value in row.items():
        if key.startswith(("time_", "bytes_")):
            totals[key] = totals.get(key, 0) + value


def _profiler(ctx: Context, role: str, device: torch.device) -> RoundProfiler:
    name = f"server_{ctx.rank}" if role == "server" and ctx.topo.num_servers > 1 else role
    path = os.path.join(ctx.output_dir, "profile", f"{name}.json")
    return RoundProfiler(path, ctx.cfg.run.profile_rounds if ctx.may_profile else 0, device.type == "cuda")


def _restore(ctx: Context, role: Server | Client) -> None:
    """Load the newest checkpoint set every rank can read (a truncated or foreign
    file falls back to the previous set) and set ``ctx.start_round`` to it."""
    if not ctx.start_round:
        return
    state, mine = None, 0
    for r in reversed([r for r in checkpoint.complete_rounds(ctx.output_dir) if r <= ctx.start_round]):
        try:
            state, mine = checkpoint.load_rank(ctx.output_dir, r, ctx.rank)["state"], r
            break
        except ValueError as e:
            log.warning("%s; trying the previous checkpoint set", e)
    agreed = -ctx.wire.max_over_ranks(-mine)  # the newest set that loads on every rank
    if agreed != mine:
        state = checkpoint.load_rank(ctx.output_dir, agreed, ctx.rank)["state"] if agreed else None
    if state is not None:
        try:
            role.load_state_dict(state)
        except (RuntimeError, KeyError) as e:
            raise ValueError(
                f"the checkpoint set of round {agreed} in {ctx.output_dir!r} does not fit this config "
                f"(model sizes or clients changed?): {str(e).splitlines()[0][:300]}"
            ) from None
    ctx.start_round = agreed
    if ctx.rank == 0 and agreed:
        log.info("resuming from the checkpoint set of round %d", agreed)
    elif ctx.rank == 0:
        log.warning("no readable checkpoint set: starting again from round 0")


def server_loop(ctx: Context, server: Server, results: RoleResults) -> dict:
    """Receive every client's x_c, reply with the loss after the forward pass, step;
    then serve the sampling requests."""
    ranks = {k: ctx.topo.client_rank(k) for k in server.clients}
    wire, run = ctx.wire, ctx.cfg.run
    totals = {"images": 0, "bytes_received": 0, "time_recv_s": 0.0, "time_compute_s": 0.0, "time_send_s": 0.0}
    profiler = _profiler(ctx, "server", server.device)
    for r in _rounds(ctx):
        t0 = time.perf_counter()
        bound = run.work_timeout_s if r == ctx.start_round else None  # the first round starts models (compile, ...)
        msgs = {k: wire.recv(ranks[k], Kind.TRAIN, r, bound) for k in server.clients}
        t1 = time.perf_counter()
        losses: list[float] = []

        def reply(k: int, msg: Message, losses=losses) -> None:
            losses.append(msg.payload.item())
            wire.send(ranks[k], msg)

        if msgs or ctx.topo.num_servers > 1:  # an idle replica still joins the gradient all-reduce
            server.train_round(msgs, reply)
        t2 = time.perf_counter()
        wire.flush()
        t3 = time.perf_counter()
        n = sum(m.count for m in msgs.values())
        row = {
            "round": r,
            "loss_server": float(np.mean(losses)) if losses else math.nan,
            "bytes_received": sum(m.nbytes for m in msgs.values()),
            "time_recv_s": t1 - t0,
            "time_compute_s": t2 - t1,
            "time_send_s": t3 - t2,
            "images_per_s": n / (t3 - t0),
        }
        results.log(row)
        _add_totals(totals, row)
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
        _end_of_round(ctx, results, server.state_dict(), r)
    profiler.close()
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
    profiler = _profiler(ctx, f"client_{client.id}", client.device)
    for r in _rounds(ctx):
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
            "loss_local": math.nan if loss_local is None else loss_local,
            "loss_server": loss_server,
            "time_local_s": t2 - t1,
            "time_wait_s": t3 - t2,
            "time_round_s": t3 - t0,
            "images_per_s": client.batch_size / (t3 - t0),
        }
        results.log(row)
        _log_audit(results, client)
        _add_totals(totals, row)
        totals["images"] += client.batch_size
        profiler.step()
        _end_of_round(ctx, results, client.state_dict(), r)
    profiler.close()
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
    results.write("samples/images", samples, unit="uint8 pixels 0..255")
    if x_h is not None:
        results.write("samples/x_handover", x_h.float().cpu().numpy(), t=client.cut.handover)
    grid = os.path.join(ctx.output_dir, "samples", f"{client.id}.png")
    os.makedirs(os.path.dirname(grid), exist_ok=True)
    save_grid(samples, grid)
    totals["images_per_s"] = totals["images"] / totals["time_round_s"] if totals["time_round_s"] else 0.0
    _log_audit(results, client)
    results.flush()
    audit = {
        "images_sent": int(results.column("audit", "images").sum()),
        "messages_sent": len(results.column("audit", "round")),
        "bytes_sent": int(results.column("audit", "nbytes").sum()),
        "t_c": client.cut.t_c,
    }
    results.write_attrs("audit", audit)
    totals.update(audit, grid=grid)
    return totals


def _log_audit(results: RoleResults, client: Client) -> None:
    for entry in client.drain_audit():
        results.log(dataclasses.asdict(entry), "audit")


def _part_path(cfg: Config, topo: Topology, rank: int) -> str:
    if topo.is_server(rank):
        name = part_name("server", str(rank))
    else:
        name = part_name("client", topo.client_ids[topo.client_index(rank)])
    return os.path.join(cfg.run.output_dir, "parts", name)


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
        _restore(ctx, role)
        results = RoleResults(_part_path(cfg, topo, rank), attrs, ctx.start_round if ctx.start_round else None)
        if isinstance(role, Server):
            summary = server_loop(ctx, role, results)
        else:
            summary = client_loop(ctx, role, results)
        results.flush()
        results.write_attrs("summary", summary)
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


def _index_roles(cfg: Config, topo: Topology) -> dict[str, str]:
    roles = {}
    for rank in range(topo.world_size):
        key = "server" if topo.is_server(rank) else f"clients/{topo.client_ids[topo.client_index(rank)]}"
        roles[key] = os.path.relpath(_part_path(cfg, topo, rank), cfg.run.output_dir)
    return roles


def print_summary(cfg: Config, summaries: dict[int, dict], topo: Topology, wall_s: float) -> None:
    out = sys.stdout
    out.write(f"\ncollafuse-hpc: {cfg.run.rounds} rounds in {wall_s:.1f} s wall\n")
    for rank in sorted(summaries):
        s = summaries[rank]
        if topo.is_server(rank):
            out.write(
                f"  server {rank}: {s['images']} images trained, {s['images_per_s']:.1f} images/s while "
                f"busy; recv wait {s['time_recv_s']:.1f} s, compute {s['time_compute_s']:.1f} s, "
                f"sampling {s['time_sampling_s']:.1f} s\n"
            )
        else:
            cid = topo.client_ids[topo.client_index(rank)]
            c = cfg.clients[topo.client_index(rank)]
            out.write(
                f"  client {cid!r} (t_c={cut_step(c, cfg.diffusion.timesteps)}): {s['images_per_s']:.1f} "
                f"images/s; local {s['time_local_s']:.1f} s, waiting {s['time_wait_s']:.1f} s; sent "
                f"{s['images_sent']} x_c images ({s['bytes_sent'] / 1e6:.2f} MB); samples {s['grid']}\n"
            )
    out.write(f"  results: {os.path.join(cfg.run.output_dir, 'results.h5')}\n")
    out.flush()


def _summaries(cfg: Config, topo: Topology) -> dict[int, dict]:
    """Each rank's summary, read from its part file (nothing is unpickled from peers)."""
    out = {}
    for rank in range(topo.world_size):
        with h5py.File(_part_path(cfg, topo, rank), "r", locking=False) as f:
            out[rank] = {k: v.item() if hasattr(v, "item") else v for k, v in f["summary"].attrs.items()}
    return out


def _log_losses(cfg: Config, topo: Topology) -> None:
    """Final loss of each role, averaged over the last logged window."""
    path = os.path.join(cfg.run.output_dir, "results.h5")
    with h5py.File(path, "r") as f:
        for key in _index_roles(cfg, topo):
            g = f[key]["rounds"]
            rows = len(g["round"]) if "round" in g else 0
            window = min(cfg.run.log_every, rows)
            tail = slice(rows - window, None)
            parts = [
                f"{n} {np.nanmean(g[n][tail]):.4f}"
                for n in ("loss_local", "loss_server")
                if n in g and not np.isnan(g[n][tail]).all()
            ]
            log.info("%s: mean of the last %d of %d rounds: %s", key, window, rows, ", ".join(parts) or "no loss")


def _start(cfg: Config, topo: Topology) -> None:
    """Rank 0 at the start: write results.h5 (once per output folder)."""
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    index = os.path.join(cfg.run.output_dir, "results.h5")
    if not os.path.exists(index):
        create_index(index, dump(cfg), cfg.run.seed, _index_roles(cfg, topo))
    else:  # resumed: record the config it runs on (only RESUMABLE keys can differ)
        record_config(index, dump(cfg))
        checkpoint.remove_incomplete(cfg.run.output_dir)  # left by the run that stopped: free their space


def _job_key(launch: Launch) -> str:
    """Shared by every rank of one job (the rendezvous address), different across jobs."""
    return f"{launch.source}:{launch.master_addr}:{launch.master_port}"


def run_distributed(cfg: Config, resume: bool, stop: StopRequest | None = None) -> None:
    """One rank of a launched job (mpirun, srun or torchrun). Raises on failure,
    Preempted after an agreed stop.

    The process groups stay initialized; the command line ends the process
    right after (tearing gloo down while peers exit can abort in C++).
    """
    launch = discover()
    topo = Topology.from_config(cfg, launch.world_size)
    start_round = preflight(cfg, resume)
    check_lock(cfg.run.output_dir, _job_key(launch))
    rank = launch.rank
    torch.set_num_threads(threads_per_rank(launch, cfg.run.threads))
    role_cfg = cfg.server if topo.is_server(rank) else cfg.clients[topo.client_index(rank)]
    device = resolve_device(role_cfg.device, launch)
    if rank == 0:
        log.info(
            "launch: %s, %d ranks (%d servers, %d clients), master %s:%d, %d threads per rank",
            launch.source,
            launch.world_size,
            topo.num_servers,
            len(topo.client_ids),
            launch.master_addr,
            launch.master_port,
            torch.get_num_threads(),
        )
    nccl, server_group = init_process_groups(launch, device, topo.num_servers, cfg.run.timeout_s)
    heartbeat = Heartbeat(lambda: store_client(launch, cfg.run.timeout_s), rank)
    wire = DistWire(rank, topo.describe, device, nccl, server_group, cfg.run.timeout_s, heartbeat)
    t0 = time.perf_counter()
    lock = RunLock(cfg.run.output_dir, _job_key(launch)) if rank == 0 else None
    try:
        if rank == 0:
            _start(cfg, topo)
        wire.barrier()
        watchdog = Watchdog(topo.describe(rank), cfg.run.watchdog_s) if cfg.run.watchdog_s > 0 else None
        ctx = Context(cfg, topo, rank, wire, start_round, dump(cfg), stop or StopRequest(), watchdog)
        run_role(ctx, build_role(cfg, topo, rank, device, wire))
        heartbeat.stop()  # no peer is waited for or worked for from here on; an evaluation may take hours
        if watchdog is not None:
            watchdog.stop()
        if rank == 0:  # every role wrote its summary into its part file before run_role's last barrier
            _log_losses(cfg, topo)
            print_summary(cfg, _summaries(cfg, topo), topo, time.perf_counter() - t0)
            _evaluate_at_end(cfg, ctx.stop)
    finally:
        if lock is not None:
            lock.release()


def run_in_process(cfg: Config, resume: bool, stop: StopRequest | None = None) -> dict[int, dict]:
    """Every role in a thread of this process; returns each rank's summary.
    Raises on failure, Preempted after a stop request."""
    topo = Topology.from_config(cfg)
    start_round = preflight(cfg, resume)
    lock = RunLock(cfg.run.output_dir, f"in-process:{socket.gethostname()}:{os.getpid()}")
    try:
        return _run_threads(cfg, topo, start_round, stop or StopRequest())
    finally:
        lock.release()


def _run_threads(cfg: Config, topo: Topology, start_round: int, stop: StopRequest) -> dict[int, dict]:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    single = discover({})
    hub = LocalHub(topo.world_size, topo.num_servers, cfg.run.timeout_s)
    t0 = time.perf_counter()
    _start(cfg, topo)
    wires, roles = [], []
    for rank in range(topo.world_size):
        role_cfg = cfg.server if topo.is_server(rank) else cfg.clients[topo.client_index(rank)]
        device = resolve_device(role_cfg.device, single)
        wires.append(LocalWire(rank, topo.describe, hub, device))
        roles.append(build_role(cfg, topo, rank, device, wires[rank]))
    summaries: dict[int, dict] = {}
    errors: dict[int, BaseException] = {}

    def target(rank: int) -> None:
        ctx = Context(cfg, topo, rank, wires[rank], start_round, dump(cfg), stop, may_profile=rank == 0)
        try:
            summaries[rank] = run_role(ctx, roles[rank])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors[rank] = e
            hub.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(topo.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        order = sorted(errors.values(), key=lambda e: isinstance(e, PeerFailure))  # the cause before its echoes
        raise order[0]
    _log_losses(cfg, topo)
    print_summary(cfg, summaries, topo, time.perf_counter() - t0)
    _evaluate_at_end(cfg, stop)
    return summaries


def _evaluate_at_end(cfg: Config, stop: StopRequest) -> None:
    """With ``eval.at_end``: evaluate the final checkpoint set in this process (rank 0).
    A stop signal ends it between batches (exit 75): the requeued run evaluates again."""
    if not cfg.eval.at_end:
        return
    from .evaluate import evaluate, print_report

    def check() -> None:
        if stop.requested:
            raise Preempted(
                cfg.run.rounds,
                stop.signal_name,
                "during the evaluation at the end; training and samples are complete and nothing of the "
                "evaluation was written: the requeued run (--resume=auto) evaluates again",
            )

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the other ranks are done
    print_report(evaluate(cfg, check))
