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

from importlib import import_module

from collafuse_hpc.version import __version__

# Loaded on first use: the command line installs its signal handlers before torch loads.
_LAZY = {
    "Config": ("collafuse_hpc.config", "Config"),
    "load_config": ("collafuse_hpc.config", "load"),
    "GaussianDiffusion": ("collafuse_hpc.diffusion.gaussian", "GaussianDiffusion"),
    "beta_schedule": ("collafuse_hpc.diffusion.gaussian", "beta_schedule"),
    "Cut": ("collafuse_hpc.diffusion.split", "Cut"),
    "run_distributed": ("collafuse_hpc.runtime.run", "run_distributed"),
    "run_in_process": ("collafuse_hpc.runtime.run", "run_in_process"),
}

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


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'collafuse_hpc' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(import_module(module), attr)
