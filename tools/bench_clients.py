#!/usr/bin/env python3
"""Many clients per rank (run.clients_per_rank): what a hosted client costs.

    python tools/bench_clients.py [--repeats 5] [--rounds 12] [--json out.json]

Side by side in one run, on the quickstart's client model (16x16 digits-sized
images, 16 base channels):
1. per-client overhead: one client rank's round (draw each client's batch and
   x_c, one batched local step of all its clients) with K clients of batch b,
   against one client with batch K*b, alternating A/B; K = 8, 32, 64. Target: the
   ratio <= 1.2. Also forward+backward alone of the K models run as this package
   does (members side by side, grouped convolutions) and with
   torch.func.functional_call + vmap over stacked weights, each against one model
   with K*b images.
2. scaling in clients: 1 server + 2 client ranks under mpirun, 8 and then 64
   clients (clients_per_rank 4 and 32) at a fixed total of images per round (and
   of samples at the end), train and sample: the client ranks' median time per
   round, 64 against 8. Target <= 1.3.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402 (imports no torch)


def _args() -> argparse.Namespace:
    """The command line, and an existing output refused (exit 2)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="alternating A/B measurements per K (part 1)")
    p.add_argument("--batch", type=int, default=4, help="images per client per round, b (part 1)")
    p.add_argument("--rounds", type=int, default=12, help="rounds of each run (part 2)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    harness.refuse_existing_outputs(p, [args.json])
    return args


if __name__ == "__main__":  # --help, a bad argument or an existing output: answered before torch loads (2 s of CPU)
    ARGS = _args()

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call, vmap  # noqa: E402

from collafuse_hpc.config import ModelConfig, from_dict  # noqa: E402
from collafuse_hpc.diffusion.unet import UNet, members_first, members_side_by_side  # noqa: E402
from collafuse_hpc.results.schema import SUMMARY, part_path  # noqa: E402
from collafuse_hpc.roles.host import ClientHost  # noqa: E402
from collafuse_hpc.tables import format_table  # noqa: E402

CLIENT_MODEL = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []}
SERVER_MODEL = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8]}
TOTAL_IMAGES = 256  # per round, in part 2


def _config(shards: list[str], out: str, clients: int, batch: int, **run) -> dict:
    raw = harness.bench_config(shards, out, SERVER_MODEL, CLIENT_MODEL, **{"clients.batch_size": batch})
    raw["clients"] = [dict(raw["clients"][0], id=f"c{k}", shard=shards[k % len(shards)]) for k in range(clients)]
    raw["run"].update(run)
    return raw


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _side_by_side(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, measured alternately (a shared machine drifts)."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_timed(a))
        tb.append(_timed(b))
    return statistics.median(ta), statistics.median(tb)


def _round(host: ClientHost):
    def work() -> None:
        for c in host.clients:
            c.begin_round(0)
            c.drain_audit()
        host.local_steps(host.clients)

    return work


def _fwd_bwd(K: int, b: int) -> dict[str, float]:
    """Seconds of forward+backward: K members side by side, K models under vmap, one
    model with K*b images (the model of part 1)."""
    cfg = ModelConfig(**CLIENT_MODEL)
    x, t = torch.randn(K * b, 1, 16, 16), torch.randint(0, 200, (K * b,))
    members, one = UNet(cfg, 1, 16, members=K), UNet(cfg, 1, 16)
    stacked = {n: p.detach().clone().unsqueeze(1).requires_grad_() for n, p in members.named_parameters()}
    single = UNet(cfg, 1, 16).to("meta")
    batched = vmap(lambda w, x, t: functional_call(single, w, (x, t)), randomness="different")

    def grouped() -> None:
        members_first(members(members_side_by_side(x, K), t.view(K, b).T), K).pow(2).mean().backward()

    def vmapped() -> None:
        batched(stacked, x.view(K, b, 1, 16, 16), t.view(K, b)).pow(2).mean().backward()

    def alone() -> None:
        one(x, t).pow(2).mean().backward()

    g, o = _side_by_side(grouped, alone, 3)
    v, _ = _side_by_side(vmapped, alone, 3)
    return {"grouped_over_one": g / o, "vmap_over_one": v / o}


def overhead(tmp: str, b: int, repeats: int) -> dict:
    shards = harness.synthetic_shards(os.path.join(tmp, "shards"), 4, 16, 1, train=512, test=8)
    rows, out = [], {}
    for K in (8, 32, 64):
        cpu = torch.device("cpu")
        many = ClientHost(from_dict(_config(shards, tmp, K, b, clients_per_rank=K)), list(range(K)), cpu)
        one = ClientHost(from_dict(_config(shards, tmp, 1, K * b)), [0], cpu)
        t_many, t_one = _side_by_side(_round(many), _round(one), repeats)
        fb = _fwd_bwd(K, b)
        out[str(K)] = {"batched_s": t_many, "one_client_s": t_one, "ratio": t_many / t_one, **fb}
        rows.append([K, b, t_many, t_one, t_many / t_one, fb["grouped_over_one"], fb["vmap_over_one"]])
    header = ["K", "b", "K clients s/round", "1 client x K*b s/round", "ratio", "fwd+bwd grouped/1", "fwd+bwd vmap/1"]
    print("\n1. per-client overhead on one rank (target ratio <= 1.2)")
    print(format_table(header, rows), flush=True)
    return out


def _client_round_times(out: str, ids: list[str], skip: int) -> tuple[float, float, float]:
    """Median round and local-step seconds of the clients (after ``skip`` warm-up rounds),
    and their median local sampling seconds."""
    rounds, local, sampling = [], [], []
    for cid in ids:
        with h5py.File(part_path(out, cid), "r") as f:
            rounds.append(np.median(f["rounds/time_round_s"][skip:]))
            local.append(np.median(f["rounds/time_local_s"][skip:]))
            sampling.append(f[SUMMARY].attrs["time_sampling_local_s"])
    return float(np.median(rounds)), float(np.median(local)), float(np.median(sampling))


def scaling(tmp: str, rounds: int) -> dict:
    shards = harness.synthetic_shards(os.path.join(tmp, "scale_shards"), 4, 16, 1, train=512, test=8)
    rows, out = [], {}
    for n in (8, 64):
        run_dir = os.path.join(tmp, f"scale{n}")
        per = TOTAL_IMAGES // n  # per client, in training and in sampling at the end
        raw = _config(shards, run_dir, n, per, clients_per_rank=n // 2, rounds=rounds, log_every=rounds)
        raw["run"]["samples_per_client"] = per
        wall = harness.launch(raw)
        t_round, t_local, t_sample = _client_round_times(run_dir, [c["id"] for c in raw["clients"]], 2)
        out[str(n)] = {"wall_s": wall, "client_round_s": t_round, "client_local_s": t_local, "sampling_s": t_sample}
        rows.append([n, TOTAL_IMAGES // n, t_round, t_local, t_sample, wall])
    ratio = out["64"]["client_round_s"] / out["8"]["client_round_s"]
    out["round_ratio_64_over_8"] = ratio
    rows.append(["64 / 8", "", ratio, out["64"]["client_local_s"] / out["8"]["client_local_s"], "", ""])
    header = ["clients", "batch", "client s/round", "local step s", "client sampling s", "wall s"]
    print(f"\n2. 1 server + 2 client ranks, {TOTAL_IMAGES} images per round (target: round ratio <= 1.3)")
    print(format_table(header, rows), flush=True)
    return out


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        figures = {"overhead": overhead(tmp, args.batch, args.repeats), "scaling": scaling(tmp, args.rounds)}
    harness.save_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
