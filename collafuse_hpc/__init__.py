"""collafuse-hpc: collaborative split-diffusion (CollaFuse) on HPC clusters.

Public API::

    from collafuse_hpc import load_config, run_distributed, run_in_process
    cfg = load_config("configs/quickstart.yaml", ["run.rounds=10"])
    run_in_process(cfg, resume=False)   # every role in one process

The folders are the architecture: ``diffusion/`` (the math, the cut, the
models), ``roles/`` (client and server), ``runtime/`` (launch, wire, loops,
checkpoints, signals), ``data/`` (shards), ``evaluation/`` (FID/KID,
disclosure, compute) and ``results/`` (the results file).
"""

from collafuse_hpc.config import Config
from collafuse_hpc.config import load as load_config
from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule
from collafuse_hpc.diffusion.split import Cut
from collafuse_hpc.runtime.run import run_distributed, run_in_process
from collafuse_hpc.version import __version__

__all__ = [
    "Config",
    "Cut",
    "GaussianDiffusion",
    "__version__",
    "beta_schedule",
    "load_config",
    "run_distributed",
    "run_in_process",
]
