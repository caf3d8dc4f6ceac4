"""TensorBoard scalars (``run.tensorboard``, the ``tensorboard`` extra): each role's
logged rounds also as event files under ``<output_dir>/tensorboard/<role>``, so
``tensorboard --logdir <output_dir>/tensorboard`` shows a live run's losses and
rates. results.h5 stays the record; this is a view of the same rows."""

from __future__ import annotations

import math
import os

from collafuse_hpc.results.schema import ROUND

INSTALL = "pip install 'collafuse-hpc[tensorboard]' (or set run.tensorboard: false)"


def check_available() -> None:
    """ValueError saying how to install TensorBoard when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ValueError(f"run.tensorboard is true but TensorBoard cannot be imported ({e}): {INSTALL}") from None


class ScalarSink:
    """Writes the numeric columns of each row as scalars at step ``round``.

    Args:
        output_dir: the run's folder.
        role: ``server``, ``server_<rank>`` or ``client_<id>`` (one event folder each).
    """

    def __init__(self, output_dir: str, role: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard", role))

    def __call__(self, row: dict[str, float]) -> None:
        for name, value in row.items():
            if name != ROUND and not math.isnan(value):
                self.writer.add_scalar(name, value, int(row[ROUND]))

    def flush(self) -> None:
        self.writer.flush()
