#!/usr/bin/env python3
"""Performance suite: ratios measured side by side in one run (docs/performance.md).

    python tools/bench.py [all|server|wire|client|scaling|data|e2e ...] [--out runs/bench-<time>] [--device cpu|cuda]

Each benchmark prints a table and writes <out>/<name>.json. What each measures and its ideal:
  server   server training images/s in a distributed run (1 server, 2 clients with tiny models)
           / the same server model on the same concatenated batch in one process, no
           communication (measured before and after the run, averaged). Target >= 0.95.
  wire     bytes the clients send per image / one float32 x_c (ideal 1.0 plus the 88-byte
           header per message), for float32 and bfloat16 wire formats; the share of each
           role's wall time spent waiting or communicating.
  client   a client's wall time per sample at cut c / full local sampling with the same
           model, for c = 0.2, 0.5, 0.8. Ideal c; target within 10% of c.
  scaling  1, 2, 4, 8 clients (oversubscribed here): the server's compute per image in the
           distributed run / the same model alone on the same total batch, measured right
           after each run (target: within 10% of 1 at every K), and the round time.
  data     the HDF5 shard reader against PIL JPEG decoding (tools/bench_loader.py).
  e2e      whole-run training images/s / one process training one DDPM (the server's
           model, all T steps) on the same images and total batch.
The reference run behind server, wire and e2e is shared. The whole suite takes about
7 minutes on a 2-core machine.
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

NAMES = ("server", "wire", "client", "scaling", "data", "e2e")


def _args() -> argparse.Namespace:
    """The command line, checked, and existing outputs refused (exit 2)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", nargs="*", help=f"benchmarks to run: all (default) or any of {', '.join(NAMES)}")
    p.add_argument("--out", default=harness.stamped("runs/bench"), help="folder for the JSON files (default: stamped)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the server's device")
    args = p.parse_args()
    unknown = sorted(set(args.which) - {"all", *NAMES})
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from all, {', '.join(NAMES)}")
    args.which = NAMES if not args.which or "all" in args.which else args.which
    harness.refuse_existing_outputs(p, [os.path.join(args.out, f"{name}.json") for name in args.which])
    return args


if __name__ == "__main__":  # --help, a bad argument or an existing output: answered before torch loads (2 s of CPU)
    ARGS = _args()

import measure  # noqa: E402
import torch  # noqa: E402

from collafuse_hpc.config import from_dict  # noqa: E402
from collafuse_hpc.evaluation.compute import client_compute  # noqa: E402
from collafuse_hpc.roles.client import Client  # noqa: E402
from collafuse_hpc.tables import format_table  # noqa: E402

SERVER_MODEL = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8]}
CLIENT_MODEL = {"base_channels": 8, "channel_mult": [1, 1], "num_res_blocks": 1, "attention_resolutions": []}
ROUNDS, SKIP = 40, 10  # rounds per distributed run; warm-up rounds left out of the figures


def _table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n{format_table(header, rows, indent='  ')}")


def reference(tmp: str, device: str) -> dict:
    """The shared run: 1 server + 2 clients, plus its single-process baselines."""
    shards = harness.synthetic_shards(os.path.join(tmp, "shards2"), 2, 16, 1)
    raw = harness.bench_config(
        shards, os.path.join(tmp, "ref"), SERVER_MODEL, CLIENT_MODEL, **{"run.rounds": ROUNDS, "server.device": device}
    )
    dev = torch.device(device)
    alone_before = measure.server_alone(raw, ROUNDS - SKIP, 3, dev)
    wall = harness.launch(raw)
    alone_after = measure.server_alone(raw, ROUNDS - SKIP, 3, dev)
    plain = measure.plain_ddpm(raw, ROUNDS - SKIP, 3, dev)
    times = measure.read_run(raw["run"]["output_dir"], SKIP)
    return {"raw": raw, "wall_s": wall, "alone": (alone_before + alone_after) / 2, "plain": plain, "times": times}


def _ratio(title: str, names: tuple[str, str], a: float, b: float) -> dict:
    """Print and return two rates measured side by side and their ratio a / b."""
    header = [f"{name.replace('_', ' ')} images/s" for name in names]
    _table(title, [*header, "ratio"], [[a, b, a / b]])
    return {f"{names[0]}_images_per_s": a, f"{names[1]}_images_per_s": b, "ratio": a / b}


def bench_server(ref: dict) -> dict:
    title = "1. server efficiency (target >= 0.95)"
    return _ratio(title, ("distributed", "alone"), ref["times"].server_images_per_s, ref["alone"])


def bench_wire(ref: dict, tmp: str) -> dict:
    raw = dict(ref["raw"], run={**ref["raw"]["run"], "output_dir": os.path.join(tmp, "bf16")})
    raw["clients"] = [{**c, "wire_dtype": "bfloat16"} for c in raw["clients"]]
    harness.launch(raw)
    half = measure.read_run(raw["run"]["output_dir"], SKIP)
    one = measure.x_c_bytes(ref["raw"])
    batch = ref["raw"]["clients"][0]["batch_size"]
    rows, out = [], {}
    for name, t, ideal in (("float32", ref["times"], 1.0), ("bfloat16", half, 0.5)):
        ratio = t.bytes_per_image / one
        with_header = ideal + measure.HEADER_BYTES / batch / one
        rows.append([name, t.bytes_per_image, ratio, with_header, t.server_wire_fraction, t.client_wait_fraction])
        out[name] = {
            "bytes_per_image": t.bytes_per_image,
            "ratio_to_float32_x_c": ratio,
            "ideal_with_header": with_header,
            "server_wire_fraction": t.server_wire_fraction,
            "client_wait_fraction": t.client_wait_fraction,
        }
    _table(
        f"2. wire cost (one float32 x_c = {one:.0f} bytes; header {measure.HEADER_BYTES} bytes per message of {batch})",
        ["wire", "bytes/image", "ratio", "ideal", "server recv+send share", "client wait share"],
        rows,
    )
    return out


def bench_client(tmp: str) -> dict:
    shards = harness.synthetic_shards(os.path.join(tmp, "shards1"), 1, 16, 1)
    rows, out = [], {}
    for c in (0.2, 0.5, 0.8):
        raw = harness.bench_config(
            shards, os.path.join(tmp, "client"), SERVER_MODEL, SERVER_MODEL, **{"clients.cut_ratio": c}
        )
        raw["diffusion"]["sampling_steps"] = 0
        client = Client(from_dict(raw), 0, torch.device("cpu"))
        m = client_compute(client, n=16, repeats=5)
        share = m["sampling_time_ratio"] / c
        rows.append([c, m["sampling_time_client_s"], m["sampling_time_full_s"], m["sampling_time_ratio"], share])
        out[str(c)] = {**m, "ratio_over_c": share}
    _table(
        "3. client sampling cost (ideal ratio = c; target ratio/c within 0.9..1.1)",
        ["c", "client s/sample", "local-only s/sample", "ratio", "ratio/c"],
        rows,
    )
    return out


def bench_scaling(tmp: str, device: str) -> dict:
    """Per number of clients K: the server's compute per image in the distributed run,
    and the same model alone on the same total batch measured right after it (the
    side-by-side ratio holds when the machine's speed drifts between runs)."""
    shards = harness.synthetic_shards(os.path.join(tmp, "shards8"), 8, 16, 1)
    rows, out, base = [], {}, None
    for k in (1, 2, 4, 8):
        raw = harness.bench_config(
            shards[:k],
            os.path.join(tmp, f"scale{k}"),
            SERVER_MODEL,
            CLIENT_MODEL,
            **{"run.rounds": ROUNDS, "server.device": device, "clients.batch_size": 16},
        )
        harness.launch(raw)
        t = measure.read_run(raw["run"]["output_dir"], SKIP)
        alone_s = 1 / measure.server_alone(raw, ROUNDS - SKIP, 3, torch.device(device))
        base = base or t.server_compute_s_per_image
        row = {
            "server_compute_ms_per_image": 1e3 * t.server_compute_s_per_image,
            "alone_ms_per_image": 1e3 * alone_s,
            "ratio_to_alone": t.server_compute_s_per_image / alone_s,
            "relative_to_1_client": t.server_compute_s_per_image / base,
            "round_s": t.server_round_s,
        }
        rows.append([k, 16 * k, *row.values()])
        out[str(k)] = row
    _table(
        "4. scaling in clients (batch 16 each; target: distributed/alone per image flat within 10%)",
        ["clients", "total batch", "server ms/image", "alone ms/image", "ratio", "relative to 1 client", "round s"],
        rows,
    )
    return out


def bench_data(out_dir: str) -> dict:
    path = os.path.join(out_dir, "data.json")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_loader.py")
    print("\n5. data loader")
    subprocess.run([sys.executable, script, "--images", "1000", "--seconds", "2", "--json", path], check=True)
    with open(path) as f:
        return json.load(f)


def bench_e2e(ref: dict) -> dict:
    title = "6. end to end (collaborative run vs one process training one DDPM, same total batch)"
    return _ratio(title, ("collaborative", "single_process"), ref["times"].run_images_per_s, ref["plain"])


def main(args: argparse.Namespace) -> int:
    which = args.which
    torch.set_num_threads(1)  # as each rank of the distributed runs
    os.makedirs(args.out, exist_ok=True)
    print(f"collafuse-hpc benchmarks on {os.cpu_count()} cores, server on {args.device}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference(tmp, args.device) if {"server", "wire", "e2e"} & set(which) else None
        results = {}
        for name in which:
            if name == "server":
                results[name] = bench_server(ref)
            elif name == "wire":
                results[name] = bench_wire(ref, tmp)
            elif name == "client":
                results[name] = bench_client(tmp)
            elif name == "scaling":
                results[name] = bench_scaling(tmp, args.device)
            elif name == "data":
                results[name] = bench_data(args.out)
            else:
                results[name] = bench_e2e(ref)
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(results[name], f, indent=2)
    print(f"\nJSON: {args.out}/<name>.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
