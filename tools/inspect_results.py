#!/usr/bin/env python3
"""Inspect results files (the same as ``collafuse-hpc inspect|export|compare``).

python tools/inspect_results.py inspect runs/quickstart-*/results.h5 [--json]
python tools/inspect_results.py export runs/x/results.h5 --out grids/ [--npy]
python tools/inspect_results.py compare runs/sweep-*/c*/results.h5
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from collafuse_hpc.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))  # argparse names a missing or unknown subcommand (exit 2)
