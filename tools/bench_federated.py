#!/usr/bin/env python3
"""The federated method's cost beside the split's (issue 32).

    python tools/bench_federated.py [--config configs/study_digits.yaml] [--repeats 5]

Side by side in one process, on the config's clients (default: the study's five
digit clients and models; shards made here from the bundled digits):
1. overhead of a federated round over the same clients' local steps: A is one
   client rank's E local steps of all its clients (batched, as a round runs them);
   B is the whole round as fed_loops runs it without the transport: each client
   starts from theta_r, takes the same E steps, computes its update, the updates
   are packed and unpacked as the wire does, and the server averages them. A and B
   alternate; the median ratio B/A is printed (the wire's copy of theta out and of
   the updates back is on top, and is measured by the bytes below).
2. bytes per participant and round, each way: federated (theta_r in, the update
   out: 2 x the model's bytes) against split (x_c out at the client's cut and wire
   dtype, the server's loss back), from the messages the roles build, and per
   image trained (federated: E batches a round; split: one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from collafuse_hpc.config import from_dict  # noqa: E402
from collafuse_hpc.data.prepare import prepare  # noqa: E402
from collafuse_hpc.data.sources import read_digits  # noqa: E402
from collafuse_hpc.roles.client import Client  # noqa: E402
from collafuse_hpc.roles.federated import FedHost, FedServer  # noqa: E402
from collafuse_hpc.runtime.wire import Kind, one_client, pack, unpack  # noqa: E402
from collafuse_hpc.tables import format_table  # noqa: E402


def _config(path: str, tmp: str) -> dict:
    """The config at ``path`` on digit shards made under ``tmp`` (the partition its shards name)."""
    with open(path) as f:
        raw = yaml.safe_load(f)
    shards = prepare(read_digits(), os.path.join(tmp, "data"), len(raw["clients"]), "class", size=16, seed=0)
    for client, shard in zip(raw["clients"], shards):
        client["shard"] = shard
    raw["run"]["output_dir"] = os.path.join(tmp, "run")
    return raw


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def overhead(raw: dict, repeats: int) -> dict[str, float]:
    """Median seconds of A (E local steps of every client) and B (the federated round)."""
    cfg = from_dict({**raw, "run": {**raw["run"], "method": "federated"}})
    device = torch.device("cpu")
    host, server = FedHost(cfg, list(range(len(cfg.clients))), device), FedServer(cfg, device)
    E = cfg.federated.local_steps

    def local_only() -> None:
        host.train(host.clients, 0, E)

    def federated_round() -> None:
        start = {c.index: server.theta for c in host.clients}
        host.start_round(start)
        host.train(host.clients, 0, E)
        sent = pack([host.update(c, 0, start[c.index]) for c in host.clients])
        server.aggregate({k: m.payload for k, m in unpack(sent).items()})
        for c in host.clients:
            c.drain_audit()

    local_only(), federated_round()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(_timed(local_only))
        b.append(_timed(federated_round))
    return {"local_s": statistics.median(a), "round_s": statistics.median(b)}


def wire_bytes(raw: dict) -> list[list]:
    """Rows (method, bytes in, bytes out, images trained, bytes per image) per
    participant and round, for client 0."""
    split = from_dict({**raw, "run": {**raw["run"], "method": "split"}})
    fed = from_dict({**raw, "run": {**raw["run"], "method": "federated"}})
    device = torch.device("cpu")
    client = Client(split, 0, device)
    x_c = client.begin_round(0)
    reply = one_client(Kind.TRAIN_REPLY, 0, 0, x_c.t_c, 1, torch.zeros(1))
    server = FedServer(fed, device)
    weights = server.message(Kind.WEIGHTS, 0, 0, server.theta)
    update = server.message(Kind.UPDATE, 0, 0, torch.cat([server.theta, torch.ones(1)]))  # theta's size, and n_k
    E, B = fed.federated.local_steps, client.batch_size
    rows = [
        ["split", reply.nbytes, x_c.nbytes, B, (reply.nbytes + x_c.nbytes) / B],
        ["federated", weights.nbytes, update.nbytes, E * B, (weights.nbytes + update.nbytes) / (E * B)],
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs/study_digits.yaml"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        raw = _config(args.config, tmp)
        t = overhead(raw, args.repeats)
        rows = wire_bytes(raw)
    E, K = from_dict(raw).federated.local_steps, len(raw["clients"])
    print(f"1. a federated round over the same {K} clients' {E} local steps (median of {args.repeats})")
    print(f"   local steps {t['local_s']:.3f} s, round {t['round_s']:.3f} s: ratio {t['round_s'] / t['local_s']:.3f}")
    print("2. bytes per participant and round (client 0)")
    table = [[m, f"{i:,}", f"{o:,}", n, f"{per:,.0f}"] for m, i, o, n, per in rows]
    print(format_table(["method", "bytes in", "bytes out", "images trained", "bytes per image"], table))
    print(f"   federated / split, bytes per round: {(rows[1][1] + rows[1][2]) / (rows[0][1] + rows[0][2]):.1f}")


if __name__ == "__main__":
    main()
