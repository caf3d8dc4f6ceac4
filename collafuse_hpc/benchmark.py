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

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import yaml

from .config import Config, from_dict, validate
from .data import ShardReader, Split, to_model_range, write_shard
from .diffusion import GaussianDiffusion, beta_schedule
from .server import Server
from .trainable import Trainable
from .unet import UNet
from .wire import HEADER_LEN, WIRE_DTYPES, Kind, Message

MPI_ENV = {  # Open MPI as root, more ranks than cores, no stale shared-memory segments
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl": "self,tcp",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMP_NUM_THREADS": "1",
}


def synthetic_shards(out: str, clients: int, size: int, channels: int, train: int = 256, test: int = 64) -> list[str]:
    """Write ``clients`` shards of smooth random images (uint8 [N, C, size, size]).

    Speed does not depend on content; these need no dataset on disk."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(clients):
        splits = {}
        for name, n in (("train", train), ("test", test)):
            coarse = rng.integers(0, 256, (n, channels, 4, 4)).astype(np.float32)
            up = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bilinear")
            splits[name] = Split(up.clamp(0, 255).to(torch.uint8).numpy(), labels=rng.integers(0, 10, n))
        path = os.path.join(out, f"client_{k}.h5")
        write_shard(path, splits, dataset="synthetic", client_id=k)
        paths.append(path)
    return paths


def bench_config(shards: list[str], out: str, server_model: dict, client_model: dict, **overrides) -> dict:
    """A run config dict for a benchmark: ``overrides`` are ``section.key`` -> value."""
    with h5py.File(shards[0], "r") as f:
        channels, size = int(f.attrs["channels"]), int(f.attrs["image_size"])
    raw = {
        "run": {"output_dir": out, "rounds": 40, "log_every": 10, "samples_per_client": 4, "threads": 1},
        "data": {"image_size": size, "channels": channels, "num_classes": 10},
        "diffusion": {"timesteps": 200, "schedule": "linear", "sampling_steps": 20},
        "server": {"device": "cpu", "model": server_model},
        "clients": [
            {"id": f"c{k}", "shard": p, "cut_ratio": 0.2, "batch_size": 32, "model": client_model}
            for k, p in enumerate(shards)
        ],
    }
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if section == "clients":
            for c in raw["clients"]:
                c[name] = value
        else:
            raw.setdefault(section, {})[name] = value
    validate(from_dict(raw))
    return raw


def launcher_command(ranks: int) -> list[str]:
    """mpirun (next to this Python, $MPIEXEC or on PATH) for ``ranks`` ranks, else
    torchrun, which ships with torch (GPU machines often have no MPI)."""
    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    found = os.environ.get("MPIEXEC") or (local if os.path.exists(local) else shutil.which("mpirun"))
    if found:
        return [found, "-np", str(ranks), sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]


def launch(raw: dict, timeout_s: float = 600) -> float:
    """Train ``raw`` with one process per role; returns the wall seconds.

    Raises RuntimeError with the end of the ranks' output when the run fails."""
    os.makedirs(raw["run"]["output_dir"], exist_ok=True)
    path = os.path.join(raw["run"]["output_dir"], "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    ranks = raw["server"].get("count", 1) + len(raw["clients"])
    cmd = [*launcher_command(ranks), "-m", "collafuse_hpc", "train", path]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"benchmark run failed ({' '.join(cmd)}):\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - t0


@dataclass
class RunTimes:
    """Steady-state figures of a finished run (rounds before ``skip`` dropped)."""

    server_images_per_s: float  # images / server round wall time
    server_compute_s_per_image: float
    server_round_s: float  # mean wall seconds per round
    server_wire_fraction: float  # (receive wait + send) / round wall
    client_wait_fraction: float  # mean over clients: waiting for the server / round wall
    run_images_per_s: float  # all clients' images / client round wall time (end to end)
    bytes_per_image: float  # what clients sent per x_c image, headers included
    gpu_peak_memory_bytes: int  # server rank, 0 on CPU


def read_run(output_dir: str, skip: int) -> RunTimes:
    """Steady-state figures from a finished run's results.h5 (every client uses the server)."""
    with h5py.File(os.path.join(output_dir, "results.h5"), "r") as f:
        s = f["server/rounds"]
        keep = s["round"][()] >= skip
        recv, compute, send = (s[k][()][keep] for k in ("time_recv_s", "time_compute_s", "time_send_s"))
        wall = recv + compute + send
        images = float((s["images_per_s"][()][keep] * wall).sum())  # images_per_s = n / round wall
        waits, client_wall, sent, sent_images = [], [], 0, 0
        for g in f["clients"].values():
            keep_c = g["rounds/round"][()] >= skip
            round_s = g["rounds/time_round_s"][()][keep_c].sum()
            waits.append(g["rounds/time_wait_s"][()][keep_c].sum() / round_s)
            client_wall.append(round_s)
            train = g["audit/kind"][()] == Kind.TRAIN
            sent += int(g["audit/nbytes"][()][train].sum())
            sent_images += int(g["audit/images"][()][train].sum())
        peak = int(f["server/summary"].attrs.get("gpu_peak_memory_bytes", 0))
    return RunTimes(
        server_images_per_s=images / wall.sum(),
        server_compute_s_per_image=compute.sum() / images,
        server_round_s=float(wall.mean()),
        server_wire_fraction=float((recv.sum() + send.sum()) / wall.sum()),
        client_wait_fraction=float(np.mean(waits)),
        run_images_per_s=images / max(client_wall),
        bytes_per_image=sent / sent_images,
        gpu_peak_memory_bytes=peak,
    )


def _x_c_messages(cfg: Config, device: torch.device) -> dict[int, Message]:
    """One round of TRAIN messages as the server would receive them (random x_c)."""
    msgs = {}
    for k, c in enumerate(cfg.clients):
        shape = (c.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        x_c = torch.randn(shape, device=device).to(WIRE_DTYPES[c.wire_dtype])
        t_c = int(round(c.cut_ratio * cfg.diffusion.timesteps))
        msgs[k] = Message(Kind.TRAIN, 0, t_c, c.batch_size, x_c)
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


HEADER_BYTES = HEADER_LEN * 8
