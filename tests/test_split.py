"""The cut: hand-over steps and sampling grids."""

import h5py
import numpy as np
import pytest
from conftest import tiny_config, write_config

from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.diffusion.split import Cut


def test_full_grid_visits_every_step_and_meets_at_the_cut():
    server, client = Cut(200, 1000).sampling_grids(1000)
    assert server == list(range(1000, 199, -1))
    assert client == list(range(200, -1, -1))


@pytest.mark.parametrize("t_c,steps", [(200, 50), (333, 100), (1, 10), (999, 10), (500, 7)])
def test_strided_grids_keep_the_cut_on_the_grid_and_split_in_proportion(t_c, steps):
    server, client = Cut(t_c, 1000).sampling_grids(steps)
    assert server[0] == 1000 and server[-1] == t_c == client[0] and client[-1] == 0
    for grid in (server, client):
        assert all(a > b for a, b in zip(grid, grid[1:]))
    n_server, n_client = len(server) - 1, len(client) - 1
    assert n_server + n_client == steps
    assert abs(n_client - steps * t_c / 1000) <= 1


def test_local_only_and_centralized_cuts():
    server, client = Cut(100, 100).sampling_grids(10)
    assert server == [] and client[0] == 100 and not Cut(100, 100).uses_server
    server, client = Cut(0, 100).sampling_grids(10)
    assert client == [] and server[-1] == 0


def test_reference_split_hands_over_at_the_authors_heuristic():
    cut = Cut(200, 1000, "reference")
    assert cut.server_anchor == 0 and cut.handover == 200 + 160
    server, client = cut.sampling_grids(1000)
    assert server[-1] == client[0] == 360
    assert Cut(200, 1000).handover == 200 and Cut(200, 1000).server_anchor == 200


def test_impossible_step_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"sampling steps must be in \[2, 100\] for hand-over step 20, got 1"):
        Cut(20, 100).sampling_grids(1)


def test_the_sampler_comes_with_the_cut_and_can_change_when_sampling_again(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 1.0], rounds=2)
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert Cut.for_client(from_dict(raw), 0).eta is None  # DDPM steps
    raw["diffusion"].update(sampler="ddim", eta=0.3)
    assert Cut.for_client(from_dict(raw), 0) == Cut(5, 20, "markov", 0, 0.3)
    assert main(["train", cfg, "--in-process"]) == 0
    with h5py.File(tmp_path / "out/results.h5") as f:
        ddpm = f["clients/c0/samples/images"][()]
    fast = ["--set", "diffusion.sampler=ddim", "--set", "diffusion.sampling_steps=6"]
    assert main(["sample", cfg, "--in-process", *fast]) == 0
    with h5py.File(tmp_path / "out/results.h5") as f:
        ddim = f["clients/c0/samples/images"][()]
        assert f["clients/c0/samples/x_handover"].attrs["t"] == 5
    assert ddim.shape == ddpm.shape and not np.array_equal(ddim, ddpm)
