"""What surrounds every round of a role: its context, the round iteration (with
fault injection and the watchdog's beat), the end of a round (the stop agreement,
flushing results, checkpoint sets) and the restore from the newest complete set.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from collafuse_hpc.config import Config
from collafuse_hpc.results.writer import RoleResults
from collafuse_hpc.roles.host import ClientHost
from collafuse_hpc.roles.server import Server
from collafuse_hpc.runtime import checkpoint
from collafuse_hpc.runtime.preemption import Preempted, StopRequest
from collafuse_hpc.runtime.topology import Topology
from collafuse_hpc.runtime.watchdog import Watchdog
from collafuse_hpc.runtime.wire import Wire

log = logging.getLogger("collafuse_hpc")


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
    attempt: int = 0  # the job's torchrun restarts, agreed by every rank (dist_wire.join); 0 for other launchers
    record: int = 0  # this invocation's record in results.h5 (results/schema.py)
    trains: bool = True  # False for ``sample``: the training summary stays as it was
    # this invocation's summaries so far by part (None: the server's), set by the role's loop:
    # what a stop writes (a client's audit totals with them), so that the run's summed
    # /summary keeps a stopped invocation's rounds
    so_far: Callable[[], dict] | None = None

    @property
    def output_dir(self) -> str:
        return self.cfg.run.output_dir

    @functools.cached_property
    def shards(self) -> dict[str, dict[str, str]]:
        """Each client's shard path and content hash, saved with every checkpoint set."""
        return checkpoint.shard_identities(self.cfg)

    def beat(self, what: str) -> None:
        self.stop.progress()
        if self.watchdog is not None:
            self.watchdog.beat(what)


def _fault(ctx: Context, round_: int) -> None:
    f = ctx.cfg.fault
    if f.mode != "slow_write" and f.rank == ctx.rank and f.round == round_ and f.attempt in (-1, ctx.attempt):
        if f.mode == "exit":
            os._exit(13)
        raise RuntimeError(f"injected fault at round {round_}")


def slow_write(ctx: Context) -> None:
    """The injected slow file system (``fault.mode: slow_write``): call inside the write it delays."""
    f = ctx.cfg.fault
    if f.mode == "slow_write" and f.rank == ctx.rank and f.attempt in (-1, ctx.attempt):
        log.info("fault: rank %d writes %.0f s slower", ctx.rank, f.delay_s)
        time.sleep(f.delay_s)


def end_of_round(ctx: Context, results: list[RoleResults], state: Callable[[], dict], r: int) -> None:
    """After round ``r``: agree on a stop request, flush results (every ``log_every``
    rounds and before each checkpoint set) and write a checkpoint set of ``state()`` (the
    role's state_dict, taken only then) when due; raise Preempted (on every rank) after a stop.

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
    if last or stop:  # every rank writes the set it ends with: no grace cuts it, however long the writes take
        ctx.stop.phase = "finishing"
    save = last or stop or bool(run.checkpoint_every and done % run.checkpoint_every == 0)
    if done % run.log_every == 0 or save:  # a set's rounds are written before it: a resume from it keeps them
        with ctx.stop.writing():
            for part in results:
                part.flush()
    if save:
        ctx.beat(f"the checkpoint set of round {done}")
        with ctx.stop.writing():
            slow_write(ctx)
            checkpoint.save_rank(ctx.output_dir, done, ctx.rank, state(), ctx.config_yaml, ctx.shards)
        ctx.wire.barrier(run.work_timeout_s)  # large checkpoints take a while on a slow file system
        if ctx.rank == 0:
            with ctx.stop.writing():
                checkpoint.mark_complete(ctx.output_dir, done, run.keep_checkpoints)
        ctx.wire.barrier()
    if stop:
        raise Preempted(done, ctx.stop.signal_name or "a signal on another rank")


def log_due(ctx: Context, r: int) -> bool:
    """Whether round ``r`` gets the loops' log lines: every ``run.log_every`` rounds, and
    the first round of each invocation at once (a run shorter than that said nothing)."""
    return (r + 1) % ctx.cfg.run.log_every == 0 or r == ctx.start_round


def log_clients(ctx: Context, r: int, losses: dict[str, float]) -> None:
    """One line for this rank's clients beside the server's: the newest local loss of each
    that trained since the last line (``losses`` by client id, emptied here: with partial
    participation a client not drawn since is left out); past four clients their mean
    and range."""
    if not losses:
        return
    if len(losses) <= 4:
        text = ", ".join(f"{who} {loss:.4f}" for who, loss in losses.items())
    else:
        values = list(losses.values())
        mean, low, high = sum(values) / len(values), min(values), max(values)
        text = f"mean {mean:.4f} over {len(values)} clients ({low:.4f} to {high:.4f})"
    log.info("clients round %d/%d loss/local %s", r + 1, ctx.cfg.run.rounds, text)
    losses.clear()


def rounds(ctx: Context):
    """The rounds still to run; keeps ``ctx.round`` current and injects faults."""
    for r in range(ctx.start_round, ctx.cfg.run.rounds):
        ctx.round = r
        ctx.beat(f"round {r}")
        _fault(ctx, r)
        yield r
    ctx.round = ctx.cfg.run.rounds
    ctx.beat("sampling")
    ctx.stop.phase = "finishing"  # the final sampling runs to its end whatever the signal


def _saved_state(ctx: Context, role: Server | ClientHost, round_: int) -> dict:
    """``role``'s state in the set of ``round_`` (a client rank's: its clients', from
    whichever files hold them); ValueError when unusable."""
    if isinstance(role, ClientHost):
        return {"clients": checkpoint.load_clients(ctx.output_dir, round_, [c.id for c in role.clients])}
    return checkpoint.load_rank(ctx.output_dir, round_, ctx.rank)["state"]


def restore(ctx: Context, role: Server | ClientHost) -> None:
    """Load the newest checkpoint set every rank can read (a truncated or foreign
    file falls back to the previous set) and set ``ctx.start_round`` to it."""
    if not ctx.start_round:
        return
    state, mine, damaged = None, 0, []
    for r in reversed([r for r in checkpoint.complete_rounds(ctx.output_dir) if r <= ctx.start_round]):
        try:  # a damaged set is skipped; an I/O error (CheckpointReadError) fails the rank
            state, mine = _saved_state(ctx, role, r), r
            break
        except ValueError as e:
            damaged.append((r, str(e)))
    for r, why in damaged:
        log.warning(
            "the checkpoint set of round %d cannot be used: %s. Continuing from the set of round %d: rounds %d..%d "
            "are trained again",
            r,
            why,
            mine,
            mine + 1,
            r,
        )
    agreed = -ctx.wire.max_over_ranks(-mine)  # the newest set that loads on every rank
    if agreed != mine:
        state = _saved_state(ctx, role, agreed) if agreed else None
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
        log.info("%s from the checkpoint set of round %d", "resuming" if ctx.trains else "sampling", agreed)
    elif ctx.rank == 0:
        log.warning("no readable checkpoint set: starting again from round 0")
