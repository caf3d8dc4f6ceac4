"""collafuse-hpc: collaborative split-diffusion (CollaFuse) on HPC clusters.

Public API::

    from collafuse_hpc import load_config, run_distributed, run_in_process
    cfg = load_config("configs/quickstart.yaml", ["run.rounds=10"])
    run_in_process(cfg, resume=False)   # every role in one process
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .config import load as load_config
from .diffusion import GaussianDiffusion, beta_schedule  # noqa: E402
from .run import run_distributed, run_in_process  # noqa: E402
from .split import Cut  # noqa: E402

__all__ = [
    "Config",
    "Cut",
    "GaussianDiffusion",
    "beta_schedule",
    "load_config",
    "run_distributed",
    "run_in_process",
]
