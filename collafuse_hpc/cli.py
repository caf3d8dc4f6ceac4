"""Command line: ``collafuse-hpc train|sample|prepare`` (also ``python -m collafuse_hpc``).

Launch lines::

    # one machine, 1 server + 2 clients
    mpirun -np 3 collafuse-hpc train configs/quickstart.yaml
    # every role in one process (debugging)
    collafuse-hpc train configs/quickstart.yaml --in-process
    # SLURM, one task per GPU
    srun --ntasks=6 collafuse-hpc train configs/celeba64.yaml
    # torchrun
    torchrun --nproc-per-node=3 -m collafuse_hpc train configs/quickstart.yaml
    # override single keys
    collafuse-hpc train configs/quickstart.yaml --set clients.0.cut_ratio=0.4 --set run.rounds=50

Exit status: 0 done, 1 a rank failed (the message names it), 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collafuse-hpc", description="Collaborative split-diffusion.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "train collaboratively, then sample (resumable with --resume)"),
        ("sample", "sample again from the latest complete checkpoint set"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("config", help="YAML run file (configs/)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
        s.add_argument("--in-process", action="store_true", help="run every role in this one process")
        if name == "train":
            s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint set")
    prep = sub.add_parser("prepare", help="build HDF5 client shards")
    prep.add_argument("dataset", choices=["digits"], help="digits: scikit-learn's bundled handwritten digits")
    prep.add_argument("--out", required=True, help="output folder for client_<k>.h5")
    prep.add_argument("--clients", type=int, default=2, help="number of clients")
    prep.add_argument("--size", type=int, default=16, help="image size in pixels")
    prep.add_argument("--partition", choices=["class", "iid"], default="class")
    prep.add_argument("--test-fraction", type=float, default=0.2)
    prep.add_argument("--seed", type=int, default=0)
    return p


def _setup_logging() -> None:
    rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


def _die(code: int, text: str, hard: bool) -> int:
    print(f"collafuse-hpc: error: {text}", file=sys.stderr, flush=True)
    if hard:  # skip MPI finalize and process-group teardown that could wait on a dead peer
        sys.stdout.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    if args.command == "prepare":
        from .prepare import prepare_digits

        try:
            prepare_digits(args.out, args.clients, args.size, args.partition, args.test_fraction, args.seed)
        except (ValueError, ImportError) as e:
            return _die(2, str(e), hard=False)
        return 0

    from . import checkpoint
    from .run import run_distributed, run_in_process

    try:
        cfg = load(args.config, args.set)
        resume = args.command == "sample" or args.resume
        if args.command == "sample":
            rounds = checkpoint.complete_rounds(cfg.run.output_dir)
            if not rounds:
                raise ValueError(f"no complete checkpoint set under {cfg.run.output_dir!r}; train first")
            cfg.run.rounds = rounds[-1]
    except (ValueError, TypeError) as e:
        return _die(2, str(e), hard=False)
    distributed = not args.in_process
    try:
        if distributed:
            run_distributed(cfg, resume)
        else:
            run_in_process(cfg, resume)
    except (ValueError, TypeError) as e:
        return _die(2, str(e), hard=distributed)
    except Exception as e:  # noqa: BLE001 - one clear line per failed rank, then exit non-zero
        return _die(1, str(e) if str(e) else type(e).__name__, hard=distributed)
    return 0
