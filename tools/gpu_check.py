#!/usr/bin/env python3
"""GPU check: the server on one GPU (bf16 autocast, channels_last), clients on CPU cores.

    python tools/gpu_check.py [--clients 4] [--rounds 40] [--size 64] [--out runs/gpu_check-<time>]

Runs, with one process per role (mpirun if there is one, else torchrun):
  A. clients at c = 0 (they only read and send: not the bottleneck): server images/s
     and the efficiency ratio against the same model stepping alone on the GPU on the
     same concatenated batch (target >= 0.95), the wire fraction, peak GPU memory;
  B. clients at c = 0.2 training their own small models on CPU: what a one-GPU
     workstation gets end to end, and who waits for whom;
  C. --many N clients (default 256) hosted by one client rank on the GPU with the
     server, in one process (one GPU cannot host two NCCL ranks): server and client
     images/s and the fraction of the time the GPU is busy (nvidia-smi's utilization,
     sampled every 100 ms).
Without a GPU it says so and runs the same at a small size on CPU (CI runs it that way).
Prints a table and writes <out>/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402 (imports no torch)


def _args() -> argparse.Namespace:
    """The command line, and an existing output refused (exit 2)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch", type=int, default=64, help="images per client per round")
    p.add_argument("--size", type=int, default=64, help="image side (pixels), 3 channels")
    p.add_argument("--compile", action="store_true", help="torch.compile the server's UNet (both measurements)")
    p.add_argument("--many", type=int, default=256, help="clients hosted on the GPU in part C (0: skip C)")
    p.add_argument("--out", default=harness.stamped("runs/gpu_check"), help="folder for gpu_check.json")
    args = p.parse_args()
    harness.refuse_existing_outputs(p, [os.path.join(args.out, "gpu_check.json")])
    return args


if __name__ == "__main__":  # --help, a bad argument or an existing output: answered before torch loads (2 s of CPU)
    ARGS = _args()

import measure  # noqa: E402
import torch  # noqa: E402

from collafuse_hpc.config import from_dict  # noqa: E402
from collafuse_hpc.runtime.run import run_in_process  # noqa: E402
from collafuse_hpc.tables import format_table  # noqa: E402

GPU_SERVER = {"base_channels": 64, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attention_resolutions": [16]}
CPU_SERVER = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []}
CLIENT = {"base_channels": 8, "channel_mult": [1, 1, 1], "num_res_blocks": 1, "attention_resolutions": []}


class GpuBusy:
    """Samples nvidia-smi's utilization.gpu (percent of time a kernel ran) in the background."""

    def __init__(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100", "-i", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> float:
        """Mean busy fraction while it ran."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
        return sum(values) / len(values) / 100 if values else float("nan")


def many_clients(tmp: str, n: int, size: int, server_model: dict, device: str, rounds: int, skip: int) -> dict:
    """C: n clients of 4 images each on one client rank plus the server, all on ``device``."""
    shards = harness.synthetic_shards(os.path.join(tmp, "many_shards"), 4, size, 3, train=64, test=16)
    out = os.path.join(tmp, "C_many_clients")
    raw = harness.bench_config(shards, out, server_model, CLIENT, **{"run.rounds": rounds, "server.device": device})
    raw["clients"] = [
        dict(raw["clients"][0], id=f"c{k}", shard=shards[k % 4], batch_size=4, device=device) for k in range(n)
    ]
    raw["run"].update(clients_per_rank=n, samples_per_client=4, log_every=rounds)
    busy = GpuBusy() if device == "cuda" else None
    run_in_process(from_dict(raw), resume=False)
    fraction = busy.stop() if busy else float("nan")
    t = measure.read_run(out, skip)
    return {"clients": n, "gpu_busy_fraction": fraction, **vars(t)}


def main(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}; server on cuda:0 with bf16 autocast, clients on CPU")
        size, server_model, rounds, batch = args.size, GPU_SERVER, args.rounds, args.batch
    else:
        print("no GPU found: running the same check on CPU at a small size (16x16, small models)")
        size, server_model, rounds, batch = 16, CPU_SERVER, min(args.rounds, 16), min(args.batch, 8)
    skip = max(2, rounds // 4)
    device = "cuda" if cuda else "cpu"
    threads = max(1, (os.cpu_count() or 2) // (args.clients + 1))
    os.makedirs(args.out, exist_ok=True)
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "compile": args.compile,
    }
    with tempfile.TemporaryDirectory() as tmp:
        shards = harness.synthetic_shards(os.path.join(tmp, "shards"), args.clients, size, 3, train=4 * batch, test=16)
        common = {
            "run.rounds": rounds,
            "run.threads": threads,
            "run.samples_per_client": 8,
            "server.device": device,
            "clients.batch_size": batch,
            "server.compile": args.compile,
        }
        for name, cut in (("A_clients_idle", 0.0), ("B_clients_training", 0.2)):
            raw = harness.bench_config(
                shards,
                os.path.join(tmp, name),
                server_model,
                CLIENT,
                **common,
                **{"clients.cut_ratio": cut, "clients.allow_centralized": cut == 0},
            )
            wall = harness.launch(raw)
            t = measure.read_run(raw["run"]["output_dir"], skip)
            results[name] = {"cut_ratio": cut, "wall_s": wall, **vars(t)}
            if cut == 0:
                torch.set_num_threads(threads)
                alone = measure.server_alone(raw, rounds - skip, 3, torch.device(device))
                results[name]["alone_images_per_s"] = alone
                results[name]["efficiency"] = t.server_images_per_s / alone
        if args.many:
            many = args.many if cuda else min(args.many, 8)
            results["C_many_clients"] = many_clients(tmp, many, size, server_model, device, rounds, skip)
    a, b = results["A_clients_idle"], results["B_clients_training"]
    print(f"\n{args.clients} clients x {batch} images of 3x{size}x{size} per round, {rounds} rounds ({skip} warm-up)")
    rows = [
        ("server images/s, clients idle (A)", f"{a['server_images_per_s']:.1f}"),
        ("same model alone on the same batch", f"{a['alone_images_per_s']:.1f}"),
        ("efficiency ratio (target >= 0.95)", f"{a['efficiency']:.3f}"),
        ("server wire fraction (A)", f"{a['server_wire_fraction']:.4f}"),
        ("peak GPU memory, server (A)", f"{a['gpu_peak_memory_bytes'] / 2**30:.2f} GiB" if cuda else "n/a (CPU)"),
        ("server images/s, clients training (B)", f"{b['server_images_per_s']:.1f}"),
        ("server wire fraction (B)", f"{b['server_wire_fraction']:.4f}"),
        ("client wait fraction (B)", f"{b['client_wait_fraction']:.4f}"),
        ("bytes per image / one x_c", f"{b['bytes_per_image'] / (3 * size * size * 4):.4f}"),
    ]
    if "C_many_clients" in results:
        c = results["C_many_clients"]
        rows += [
            (f"server images/s, {c['clients']} clients on the GPU (C)", f"{c['server_images_per_s']:.1f}"),
            ("client images/s, all of them (C)", f"{c['run_images_per_s']:.1f}"),
            ("GPU busy fraction (C)", f"{c['gpu_busy_fraction']:.3f}"),
        ]
    print(format_table(["figure", "value"], [list(r) for r in rows], indent="  "))
    path = os.path.join(args.out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=float)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
