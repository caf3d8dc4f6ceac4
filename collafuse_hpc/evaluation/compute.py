"""Client compute: FLOPs and measured wall time of a client's share of sampling and
training, against doing everything locally with the same model.

Sampling: the client runs the grid h..0 of its cut instead of T..0, so with
equal per-step cost the ideal ratio is its share of the grid (about c).
Training: one local step per round either way (t ~ U{1..t_c} instead of
U{1..T} costs the same), plus drawing x_c; the saving is that the server's
part of the chain never runs on the client. FLOPs come from
torch.utils.flop_counter (multiply-adds count 2).
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from collafuse_hpc.diffusion.gaussian import EpsModel, GaussianDiffusion
from collafuse_hpc.roles.client import Client


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _loop_flops(diffusion: GaussianDiffusion, eps: EpsModel, x: torch.Tensor, grid: list[int], **kw) -> int:
    """FLOPs of running the sampling loop over ``grid`` from ``x``: every model call the
    loop makes, each counted at its input shapes (a call's FLOPs depend on nothing else,
    and counting is slow, so each shape is counted once). The loop's own arithmetic is
    elementwise, which FLOP counters leave out."""
    per_shape: dict[tuple, int] = {}
    total = 0

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        shapes = (tuple(x.shape), tuple(t.shape))
        if shapes not in per_shape:
            with FlopCounterMode(display=False) as counter:
                out = eps(x, t)
            per_shape[shapes] = int(counter.get_total_flops())
        else:
            out = eps(x, t)
        total += per_shape[shapes]
        return out

    if grid:
        diffusion.p_sample_loop(counted, x, grid, **kw)
    return total


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _timed_pair(a, b, repeats: int) -> tuple[float, float, float]:
    """Time ``a`` and ``b`` side by side ``repeats`` times, alternating which goes first
    (warm up before: the FLOP count does). Returns (mean seconds of a, of b, and their
    ratio): taken side by side in alternating order, the ratio holds on a machine whose
    speed drifts."""
    a_total = b_total = 0.0
    for i in range(repeats):
        if i % 2:
            b_total += _seconds(b)
            a_total += _seconds(a)
        else:
            a_total += _seconds(a)
            b_total += _seconds(b)
    return a_total / repeats, b_total / repeats, a_total / b_total


def client_compute(client: Client, n: int, repeats: int) -> dict[str, float]:
    """Measure ``client``'s share against local-only work with its own model, on the
    grids of its cut (same step count for both).

    Args:
        n: images per sampling batch.
        repeats: timings of each side by side (eval.timing_repeats).
    Returns (FLOPs as counts, times in seconds, ratios dimensionless):
        sampling_steps_client / _full, sampling_flops_client / _full (per image),
        sampling_time_client_s / _full_s (per image), sampling_time_ratio,
        sampling_ideal_ratio (the client's share of the grid; c for equal models),
        train_flops_client / _full (per image, one round), train_time_client_s / _full_s
        (per round), train_time_ratio.
    """
    diffusion, device = client.diffusion, client.device
    shape = (n, client.cfg.data.channels, client.cfg.data.image_size, client.cfg.data.image_size)
    labels = torch.from_numpy(client.train_labels).to(device) if client.condition else None

    def eps_for(rows: int) -> EpsModel:
        """The sampling copy for a batch of ``rows`` images: with its own labels cycled to
        ``rows`` when it uses labels (the labels must be those of the batch it runs on)."""
        y = None if labels is None else labels[torch.arange(rows, device=device) % len(labels)]
        return client.eps_model(True, y)

    eps = eps_for(n)
    _, share = client.cut.sampling_grids()
    _, full = client.cut.full_chain().sampling_grids()
    timing = torch.Generator(device).manual_seed(0)  # timing inputs: nobody's stream, not the global one
    x = torch.randn(shape, device=device, generator=timing)

    loop = {"a": 0, "clip": True, "generator": timing, "eta": client.cut.eta}

    def sample(grid: list[int]):
        if not grid:
            return lambda: None
        return lambda: diffusion.p_sample_loop(eps, x, grid, **loop)

    # the FLOPs of running each loop on one image (what the loop does, not steps x one step's
    # count; one image: FLOPs grow linearly with the batch)
    flops_share, flops_full = (_loop_flops(diffusion, eps_for(1), x[:1], grid, **loop) for grid in (share, full))
    time_share, time_full, ratio = _timed_pair(sample(share), sample(full), repeats)
    out = {
        "sampling_steps_client": max(0, len(share) - 1),
        "sampling_steps_full": len(full) - 1,
        "sampling_flops_client": flops_share,
        "sampling_flops_full": flops_full,
        "sampling_time_client_s": time_share / n,
        "sampling_time_full_s": time_full / n,
        "sampling_time_ratio": ratio,
        "sampling_ideal_ratio": max(0, len(share) - 1) / (len(full) - 1),
    }
    out.update(_train_compute(client, repeats))
    return out


def _train_compute(client: Client, repeats: int) -> dict[str, float]:
    """One round's client work (draw x_c + local step) against one full-chain local step;
    measured in :meth:`Client.scratch`, so the client is as before afterwards."""

    def round_client() -> None:
        client.begin_round(0)
        client.local_step()

    def round_full() -> None:
        client.begin_round(0)
        client.local_step(t_max=client.cut.timesteps)

    with client.scratch():
        flops_client = _flops(round_client)
        flops_full = _flops(round_full)
        time_client, time_full, ratio = _timed_pair(round_client, round_full, repeats)
    b = client.batch_size
    return {
        "train_flops_client": flops_client / b,
        "train_flops_full": flops_full / b,
        "train_time_client_s": time_client,
        "train_time_full_s": time_full,
        "train_time_ratio": ratio,
    }
