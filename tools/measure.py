"""Performance measurements behind ``tools/bench.py`` and ``tools/gpu_check.py``.

Every figure is a ratio of two rates measured side by side in the same process
tree, so it holds on a noisy shared machine:

- server efficiency: the server's training images/s in a distributed run divided
  by the same model stepping on the same concatenated batch in one process with
  no communication (:func:`server_alone`);
- wire cost: bytes sent per image against one x_c, and each role's share of wall
  time spent waiting or communicating (from the timers runs store in results.h5);
- end to end: the collaborative run's training images/s against one process
  training one DDPM on the same total batch (:func:`plain_ddpm`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from collafuse_hpc.config import Config, from_dict
from collafuse_hpc.data import ShardReader, to_model_range
from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule
from collafuse_hpc.diffusion.split import Cut
from collafuse_hpc.diffusion.trainable import Trainable
from collafuse_hpc.diffusion.unet import UNet
from collafuse_hpc.results.schema import CLIENTS, ROUND, ROUNDS, SERVER, SUMMARY, index_path
from collafuse_hpc.roles.server import Server
from collafuse_hpc.runtime.wire import HEADER_LEN, PART_LEN, WIRE_DTYPES, Kind, Message, one_client


@dataclass
class RunTimes:
    """Steady-state figures of a finished run (rounds before ``skip`` dropped)."""

    server_images_per_s: float  # images / server round wall time
    server_compute_s_per_image: float
    server_round_s: float  # mean wall seconds per round
    server_wire_fraction: float  # (receive wait + send) / round wall
    client_wait_fraction: float  # mean over clients: waiting for the server / round wall
    run_images_per_s: float  # all clients' images / client round wall time (end to end)
    bytes_per_image: float  # what the server received per x_c image, headers and parts tables included
    gpu_peak_memory_bytes: int  # server rank, 0 on CPU


def read_run(output_dir: str, skip: int) -> RunTimes:
    """Steady-state figures from a finished run's results.h5 (every client uses the server)."""
    with h5py.File(index_path(output_dir), "r") as f:
        s = f[f"{SERVER}/{ROUNDS}"]
        keep = s[ROUND][()] >= skip
        recv, compute, send = (s[k][()][keep] for k in ("time_recv_s", "time_compute_s", "time_send_s"))
        wall = recv + compute + send
        images = float((s["images_per_s"][()][keep] * wall).sum())  # images_per_s = n / round wall
        received = float(s["bytes_received"][()][keep].sum())  # each client's x_c message, header included
        waits, client_wall = [], []
        for g in f[CLIENTS].values():
            rows = g[ROUNDS]
            keep_c = rows[ROUND][()] >= skip
            round_s = rows["time_round_s"][()][keep_c].sum()
            waits.append(rows["time_wait_s"][()][keep_c].sum() / round_s)
            client_wall.append(round_s)
        peak = int(f[f"{SERVER}/{SUMMARY}"].attrs.get("gpu_peak_memory_bytes", 0))
    return RunTimes(
        server_images_per_s=images / wall.sum(),
        server_compute_s_per_image=compute.sum() / images,
        server_round_s=float(wall.mean()),
        server_wire_fraction=float((recv.sum() + send.sum()) / wall.sum()),
        client_wait_fraction=float(np.mean(waits)),
        run_images_per_s=images / max(client_wall),
        bytes_per_image=received / images,
        gpu_peak_memory_bytes=peak,
    )


def _x_c_messages(cfg: Config, device: torch.device) -> dict[int, Message]:
    """One round of TRAIN messages as the server would receive them (random x_c)."""
    msgs = {}
    for k, c in enumerate(cfg.clients):
        shape = (c.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        x_c = torch.randn(shape, device=device).to(WIRE_DTYPES[c.wire_dtype])
        msgs[k] = one_client(Kind.TRAIN, 0, k, Cut.for_client(cfg, k).t_c, c.batch_size, x_c)
    return msgs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def server_alone(raw: dict, rounds: int, warmup: int, device: torch.device) -> float:
    """Images/s of the run's server model stepping on the same concatenated batch in
    this process, with no communication (the denominator of server efficiency)."""
    cfg = from_dict(raw)
    server = Server(cfg, list(range(len(cfg.clients))), device)
    msgs = _x_c_messages(cfg, device)
    n = sum(m.count for m in msgs.values())
    for _ in range(warmup):
        server.train_round(msgs, lambda k, m: None)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        server.train_round(msgs, lambda k, m: None)
        _sync(device)
    return n * rounds / (time.perf_counter() - t0)


def plain_ddpm(raw: dict, rounds: int, warmup: int, device: torch.device) -> float:
    """Images/s of what a user would otherwise run: one process training one DDPM
    (the server's model size, all T steps) on the clients' images, same total batch."""
    cfg = from_dict(raw)
    torch.manual_seed(0)
    model = UNet(cfg.server.model, cfg.data.channels, cfg.data.image_size)
    net = Trainable(model, cfg.server.optim, device, cfg.server.compile)
    diffusion = GaussianDiffusion(beta_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps))
    readers = [ShardReader(c.shard) for c in cfg.clients]
    batches = [c.batch_size for c in cfg.clients]
    rng = np.random.default_rng(0)
    T = cfg.diffusion.timesteps

    def step() -> None:
        parts = [r.read(np.sort(rng.choice(len(r), b, replace=False)))[0] for r, b in zip(readers, batches)]
        x0 = to_model_range(np.concatenate(parts), device)
        t = torch.randint(1, T + 1, (len(x0),), device=device)
        loss = diffusion.training_losses(lambda x, t: net.forward(x, t), x0, t, torch.randn_like(x0)).mean()
        net.step(loss)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        step()
    _sync(device)
    return sum(batches) * rounds / (time.perf_counter() - t0)


def x_c_bytes(raw: dict) -> float:
    """Bytes of one float32 x_c image: the ideal wire cost per image."""
    return raw["data"]["channels"] * raw["data"]["image_size"] ** 2 * 4


HEADER_BYTES = (HEADER_LEN + PART_LEN) * 8  # a one-client message: the header and its row of the parts table
