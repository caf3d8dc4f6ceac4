"""Running a job: every rank of a launched job (:func:`run_distributed`), or every
role in a thread of one process (:func:`run_in_process`, for debugging and the
equivalence tests). Both start the results file, build the roles, run the
loops of runtime/loops.py and summarize.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time

import h5py
import torch
import yaml

from collafuse_hpc.config import Config, dump, to_dict, with_defaults
from collafuse_hpc.config_rules import changed_keys, ignored_keys, ignored_warning
from collafuse_hpc.results.inspection import run_commands
from collafuse_hpc.results.schema import SUMMARY, index_path, open_results, plain_attrs, record_key, role_key
from collafuse_hpc.results.writer import begin_record, create_index, finish_record, record_config
from collafuse_hpc.runtime import checkpoint
from collafuse_hpc.runtime.dist_wire import connect, join
from collafuse_hpc.runtime.launch import Launch, discover, resolve_device, threads_per_rank, torch_threads
from collafuse_hpc.runtime.local_wire import LocalHub, LocalWire
from collafuse_hpc.runtime.lock import RunLock
from collafuse_hpc.runtime.lock import check as check_lock
from collafuse_hpc.runtime.loops import part_file, run_role, summary_key
from collafuse_hpc.runtime.methods import build_role
from collafuse_hpc.runtime.preemption import Preempted, StopRequest
from collafuse_hpc.runtime.preflight import preflight
from collafuse_hpc.runtime.rounds import Context
from collafuse_hpc.runtime.topology import Topology
from collafuse_hpc.runtime.watchdog import Watchdog
from collafuse_hpc.runtime.wire import PeerFailure
from collafuse_hpc.tables import cell

log = logging.getLogger("collafuse_hpc")
MAX_CLIENT_LINES = 16  # clients listed in the summary at the end of a run


def _roles(topo: Topology) -> list[tuple[int, int | None]]:
    """Every role of a run as (rank, client index or None for a server), in rank order."""
    return [(rank, None) for rank in range(topo.num_servers)] + [
        (rank, k) for rank in range(topo.num_servers, topo.world_size) for k in topo.clients_on(rank)
    ]


def _summary_order(cfg: Config, topo: Topology) -> list[str]:
    return [summary_key(cfg, topo, rank, k) for rank, k in _roles(topo)]


def _index_roles(cfg: Config, topo: Topology) -> dict[str, str]:
    """{role key in results.h5: its part file relative to the output folder}."""
    roles = {}
    for rank, k in _roles(topo):
        key = role_key(None, rank) if k is None else role_key(topo.client_ids[k])
        roles[key] = os.path.relpath(part_file(cfg, topo, rank, k), cfg.run.output_dir)
    return roles


def print_summary(cfg: Config, summaries: dict[str, dict], wall_s: float) -> None:
    """Each role's losses (logged) and rates (printed) at the end of a run; ``summaries``
    by loops.summary_key."""
    for name, s in summaries.items():
        losses = [
            f"{k[:-7]} {cell(s[k])}"  # as inspect prints them
            for k in ("loss_local_recent", "loss_server_recent")
            if not math.isnan(s.get(k, math.nan))
        ]
        if not s.get("rounds_run", 0):
            log.info("%s: no rounds trained in this invocation (sampling only)", name)
            continue
        if name.startswith("server_") and not s.get("images", 0):
            log.info("%s: idle in the %d rounds this invocation trained (no client sent x_c)", name, s["rounds_run"])
            continue
        log.info(
            "%s: mean over the last 10%% of the rounds (the last %d of %d rounds logged in this invocation): %s",
            name,
            s.get("loss_window", 0),
            s.get("loss_rows", 0),
            ", ".join(losses) or "no loss",
        )
    out = sys.stdout
    out.write(f"\ncollafuse-hpc: {_scope(cfg, summaries, wall_s)}\n")
    shown, clients = 0, [name for name in summaries if name.startswith("client_")]
    for name, s in summaries.items():
        if name.startswith("server_"):
            out.write(f"  {name.replace('_', ' ')}: {_server_line(s)}\n")
        elif shown < MAX_CLIENT_LINES:
            shown += 1
            out.write(f"  client {name[len('client_') :]!r} (t_c={s['t_c']}): {_client_line(s, cfg)}\n")
    if len(clients) > shown:
        out.write(f"  ... and {len(clients) - shown} more clients (collafuse-hpc inspect shows them all)\n")
    out.write(f"  results: {index_path(cfg.run.output_dir)}\n")
    commands = run_commands(cfg.run.output_dir)
    if cfg.eval.at_end:  # it is evaluated next, in this process
        del commands["evaluate"]
    out.write("  next: " + "\n        ".join(commands.values()) + "\n")
    out.flush()


def _scope(cfg: Config, summaries: dict[str, dict], wall_s: float) -> str:
    """What this invocation did: the figures below are its own, unless they say 'over the run'."""
    trained = max(s.get("rounds_run", 0) for s in summaries.values())
    sampled = f"{cfg.run.samples_per_client} images per client"
    if not trained:
        return f"this invocation sampled {sampled} from the checkpoint set of round {cfg.run.rounds} in {wall_s:.1f} s"
    first = cfg.run.rounds - trained + 1
    resumed = f" (resumed from the checkpoint set of round {first - 1})" if first > 1 else ""
    return f"this invocation trained rounds {first}-{cfg.run.rounds}{resumed} and sampled {sampled} in {wall_s:.1f} s"


def _server_line(s: dict) -> str:
    """A server's training (when this invocation trained) and sampling."""
    if "updates" in s:  # the federated server
        averaged = (
            f"averaged {s['updates']} updates of {s['images']} images trained by the clients; "
            if s.get("rounds_run")
            else ""
        )
        return averaged + f"sent the global model to every client in {s['time_sampling_s']:.1f} s"
    training = ""
    if s.get("rounds_run", 0):
        training = "idle in training (no client sent x_c); "
        if s["images"]:
            training = (
                f"{s['images']} images trained, {s['images_per_s']:.1f} images/s while busy; recv wait "
                f"{s['time_recv_s']:.1f} s, compute {s['time_compute_s']:.1f} s; "
            )
    return training + f"sampled {s['images_sampled']} images (its part of the chain) in {s['time_sampling_s']:.1f} s"


def _client_line(s: dict, cfg: Config) -> str:
    """A client's training (when this invocation trained), sampling and x_c sent: by this
    invocation, and over the run where that differs (the audit counts every invocation)."""
    training = ""
    if s.get("rounds_run", 0):
        training = (
            f"{s['images']} images trained, {s['images_per_s']:.1f} images/s; local {s['time_local_s']:.1f} s, "
            f"waiting {s['time_wait_s']:.1f} s; "
        )
    sampling = (
        f"sampled {cfg.run.samples_per_client} images in {s['time_sampling_wait_s'] + s['time_sampling_local_s']:.1f} s"
    )
    updates = "bytes_received_model" in s  # a federated client: it sent updates and received the global model
    what, count = ("model updates", "messages_sent") if updates else ("x_c images", "images_sent")
    sent = f"sent {s[f'invocation_{count}']} {what} ({s['invocation_bytes_sent'] / 1e6:.2f} MB)"
    if s[count] != s[f"invocation_{count}"]:
        sent += f", {s[count]} over the run ({s['bytes_sent'] / 1e6:.2f} MB)"
    return f"{training}{sampling}; {sent}; samples {s['grid']}"


def _summaries(cfg: Config, topo: Topology, record: int) -> dict[str, dict]:
    """Each role's summary of this invocation, read from its part file (nothing is
    unpickled from peers)."""
    out = {}
    for rank, k in _roles(topo):
        with h5py.File(part_file(cfg, topo, rank, k), "r", locking=False) as f:
            out[summary_key(cfg, topo, rank, k)] = plain_attrs(f[record_key(record, SUMMARY)])
    return out


def _start(cfg: Config, topo: Topology, command: str, start_round: int) -> int:
    """Rank 0 at the start: write results.h5 (once per output folder) and append this
    invocation's record (train, resume or sample); returns its number."""
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    index = index_path(cfg.run.output_dir)
    ignored, warning = ignored_keys(cfg), ignored_warning(cfg)
    if warning:
        log.warning("%s", warning)
    if not os.path.exists(index):
        create_index(index, dump(cfg), cfg.run.seed, _index_roles(cfg, topo))
        return begin_record(index, command, start_round, {}, ignored)
    with open_results(index) as f:
        trained_with = yaml.safe_load(f.attrs["config"])
    n = begin_record(index, command, start_round, changed_keys(with_defaults(trained_with), to_dict(cfg)), ignored)
    if command == "resume":  # record the config it trains on (only RESUMABLE keys can differ)
        record_config(index, dump(cfg))
        checkpoint.remove_incomplete(cfg.run.output_dir)  # left by the run that stopped: free their space
    return n


def _command(resume: bool | str, sample: bool) -> str:
    return "sample" if sample else ("resume" if resume else "train")


def _finish(cfg: Config, record: int, summaries: dict[str, dict], wall_s: float, stopped: str = "") -> None:
    """Rank 0 at the end, or after a stop (``stopped``: by what, after which round; it
    sampled nothing): what this invocation did, into its record (the rounds its roles
    ran: from the set they agreed on, which may be older than the newest)."""
    rounds_run = max(s.get("rounds_run", 0) for s in summaries.values())
    totals = {"rounds_run": rounds_run, "wall_s": round(wall_s, 3)}
    totals |= {"stopped": stopped} if stopped else {"samples_per_client": cfg.run.samples_per_client}
    finish_record(index_path(cfg.run.output_dir), record, totals)


def _finish_stopped(cfg: Config, topo: Topology, record: int, wall_s: float, stop: Preempted) -> None:
    """Rank 0 after a stop: the record says what the invocation trained and what stopped
    it. A failure to write it is logged, not raised: the checkpoint set is complete and
    the exit stays 75 (requeue)."""
    try:
        _finish(
            cfg, record, _summaries(cfg, topo, record), wall_s, stopped=f"{stop.signal_name} after round {stop.round}"
        )
    except Exception as e:  # noqa: BLE001 - a full disk or a broken part file: the requeue matters more
        log.warning("could not record what the stopped invocation trained: %s: %s", type(e).__name__, e)


def _job_key(launch: Launch) -> str:
    """Shared by every rank of one job (the rendezvous address), different across jobs."""
    return f"{launch.source}:{launch.master_addr}:{launch.master_port}"


def _device(cfg: Config, topo: Topology, rank: int, launch: Launch) -> torch.device:
    """The device the config asks for ``rank``'s role (``auto``: the GPU of its local rank)."""
    role_cfg = cfg.server if topo.is_server(rank) else cfg.clients[topo.clients_on(rank)[0]]  # one device per rank
    return resolve_device(role_cfg.device, launch)


def run_distributed(cfg: Config, resume: bool | str, stop: StopRequest | None = None, sample: bool = False) -> None:
    """One rank of a launched job (mpirun, srun or torchrun). Raises on failure,
    Preempted after an agreed stop. ``sample``: only sample again from the newest set
    (``cfg.run.rounds`` is its round); the training summary stays as it was. A worker
    that torchrun restarted (``--max-restarts``) continues from the newest complete
    checkpoint set, as ``--resume=auto`` does.

    The process groups stay initialized; the command line ends the process
    right after (tearing gloo down while peers exit can abort in C++).
    """
    launch = discover()
    stop = stop or StopRequest()
    stop.grace_s = cfg.run.stop_grace_s
    stop.phase = "starting"  # waits for the other ranks: a signal ends this one at once
    attempt = join(launch, cfg.run.timeout_s)  # every rank's, where torchrun's agents count restarts each their own
    stop.phase = "checking"
    if attempt.restarts and not resume:
        resume = "auto"
        if launch.rank == 0:
            log.info("torchrun restart %d: continuing from the newest complete checkpoint set", attempt.restarts)
    topo = Topology.from_config(cfg, launch.world_size)
    start_round = preflight(cfg, resume, sample)
    check_lock(cfg.run.output_dir, _job_key(launch))
    stop.checked()
    rank = launch.rank
    torch.set_num_threads(threads_per_rank(launch, cfg.run.threads))
    device = _device(cfg, topo, rank, launch)
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
    wire = connect(launch, attempt, device, topo.num_servers, topo.describe, cfg.run.timeout_s)
    stop.phase = "rounds"  # every rank is here: from now on a signal stops all at an agreed round
    t0 = time.perf_counter()
    lock = RunLock(cfg.run.output_dir, _job_key(launch)) if rank == 0 else None
    try:
        record = 0
        if rank == 0:
            with stop.writing():
                record = _start(cfg, topo, _command(resume, sample), start_round)
        record = wire.max_over_ranks(record)  # every rank writes its samples and totals under it
        watchdog = Watchdog(topo.describe(rank), cfg.run.watchdog_s) if cfg.run.watchdog_s > 0 else None
        ctx = Context(cfg, topo, rank, wire, start_round, dump(cfg), stop, watchdog, attempt=attempt.restarts)
        ctx.record, ctx.trains = record, not sample
        try:
            run_role(ctx, *build_role(cfg, topo, rank, device, wire))
        except Preempted as e:
            if not sample:
                if rank == 0:  # every role wrote what it trained before run_role's barrier
                    _finish_stopped(cfg, topo, record, time.perf_counter() - t0, e)
                wire.barrier(cfg.run.work_timeout_s)  # mpirun ends every rank once one exits: rank 0 writes first
            raise
        wire.heartbeat.stop()  # no peer is waited for or worked for from here on; an evaluation may take hours
        if watchdog is not None:
            watchdog.stop()
        if rank == 0:  # every role wrote its summary into its part file before run_role's last barrier
            summaries = _summaries(cfg, topo, record)
            print_summary(cfg, summaries, time.perf_counter() - t0)
            _finish(cfg, record, summaries, time.perf_counter() - t0)
            _evaluate_at_end(cfg, ctx.stop)
    finally:
        if lock is not None:
            lock.release()


def run_in_process(
    cfg: Config, resume: bool | str, stop: StopRequest | None = None, sample: bool = False
) -> dict[str, dict]:
    """Every role in a thread of this process; returns each role's summary of this
    invocation by its part file's name (``server_0``, ``client_<id>``).
    Raises on failure, Preempted after a stop request. ``sample`` as in run_distributed."""
    topo = Topology.from_config(cfg)
    start_round = preflight(cfg, resume, sample)
    stop = stop or StopRequest()
    stop.grace_s = cfg.run.stop_grace_s
    stop.checked()
    lock = RunLock(cfg.run.output_dir, f"in-process:{socket.gethostname()}:{os.getpid()}")
    try:
        with torch_threads(cfg.run.threads):
            return _run_threads(cfg, topo, start_round, stop, _command(resume, sample))
    finally:
        lock.release()


def _run_threads(cfg: Config, topo: Topology, start_round: int, stop: StopRequest, command: str) -> dict[str, dict]:
    single = discover({})
    hub = LocalHub(topo.world_size, topo.num_servers, cfg.run.timeout_s)
    t0 = time.perf_counter()
    stop.phase = "rounds"
    with stop.writing():
        record = _start(cfg, topo, command, start_round)
    wires, roles = [], []
    for rank in range(topo.world_size):
        device = _device(cfg, topo, rank, single)
        wires.append(LocalWire(rank, topo.describe, hub, device))
        roles.append(build_role(cfg, topo, rank, device, wires[rank]))
    summaries: dict[str, dict] = {}
    errors: dict[int, BaseException] = {}

    def target(rank: int) -> None:
        ctx = Context(cfg, topo, rank, wires[rank], start_round, dump(cfg), stop, may_profile=rank == 0)
        ctx.record, ctx.trains = record, command != "sample"
        try:
            summaries.update(run_role(ctx, *roles[rank]))
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
        if isinstance(order[0], Preempted) and command != "sample":  # each role wrote what it trained
            _finish_stopped(cfg, topo, record, time.perf_counter() - t0, order[0])
        raise order[0]
    summaries = {key: summaries[key] for key in _summary_order(cfg, topo)}
    print_summary(cfg, summaries, time.perf_counter() - t0)
    _finish(cfg, record, summaries, time.perf_counter() - t0)
    _evaluate_at_end(cfg, stop)
    return summaries


def _evaluate_at_end(cfg: Config, stop: StopRequest) -> None:
    """With ``eval.at_end``: evaluate the final checkpoint set in this process (rank 0),
    at ``run.threads`` torch threads, or every core when that is 0 (auto). A stop signal
    ends it before its next batch or part (exit 75): the requeued run evaluates again."""
    if not cfg.eval.at_end:
        return
    from collafuse_hpc.evaluation.evaluate import evaluate, print_report  # the models of FID: only when asked

    def check() -> None:
        if stop.requested:
            raise Preempted(
                cfg.run.rounds,
                stop.signal_name,
                "during the evaluation at the end; training and samples are complete and nothing of the "
                "evaluation was written: the requeued run (--resume=auto) evaluates again",
            )

    # run.threads when set (the cores may be shared: more threads would spin-wait), else every core: the other
    # ranks are done
    print_report(evaluate(cfg, check, threads=cfg.run.threads or len(os.sched_getaffinity(0))))
