"""Optional torch.profiler trace of a few training rounds per role (``run.profile_rounds``).

Each rank writes ``<output_dir>/profile/<role>.json`` (Chrome trace format: open
it in chrome://tracing or https://ui.perfetto.dev). Two warm-up rounds are
skipped so the trace shows the steady state, not allocator and kernel warm-up.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.profiler import ProfilerActivity, profile, schedule

log = logging.getLogger("collafuse_hpc")

WARMUP_ROUNDS = 2


class RoundProfiler:
    """Call :meth:`step` once per round and :meth:`close` after the loop; a no-op
    when ``rounds`` is 0."""

    def __init__(self, path: str, rounds: int, cuda: bool):
        self.path = path
        self._prof = None
        if rounds > 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self._prof = profile(
                activities=activities,
                schedule=schedule(wait=0, warmup=WARMUP_ROUNDS, active=rounds, repeat=1),
                on_trace_ready=self._write,
                record_shapes=True,
            )
            self._prof.start()

    def _write(self, prof: torch.profiler.profile) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        prof.export_chrome_trace(self.path)
        log.info("profiler trace written to %s", self.path)

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        """Stop tracing; the trace is written when the active rounds were reached."""
        if self._prof is not None:
            self._prof.stop()
            self._prof = None
