#!/usr/bin/env python3
"""The sweep and study report (the same as ``collafuse-hpc report``).

python tools/report.py runs/study-*/c*/results.h5 --out runs/study-x/report [--record N]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from collafuse_hpc.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["report", *sys.argv[1:]]))
