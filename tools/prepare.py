#!/usr/bin/env python3
"""Prepare per-client HDF5 shards; the same as ``collafuse-hpc prepare``.

    python tools/prepare.py celeba --root /data/celeba --out data/celeba64 --clients 5 \\
        --partition attributes --groups 'Male;Eyeglasses;Smiling;Wearing_Hat;Blond_Hair' \\
        --size 64 --crop 140 --train-size 2000 --test-size 5000
    python tools/prepare.py --help
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from collafuse_hpc.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
