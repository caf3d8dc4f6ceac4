"""The cut: hand-over steps and sampling grids."""

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_config, write_config

from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.diffusion.split import Cut
from collafuse_hpc.runtime.run import run_in_process


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


@pytest.mark.parametrize("mode", ["markov", "reference"])
@pytest.mark.parametrize("steps", [0, 2, 7, 50, 1000])
def test_every_cut_from_0_to_T_gives_valid_grids_that_end_at_0(mode, steps):
    """Grids for every t_c of T = 1000 (the reference split's hand-over reaches T from
    t_c = 978 on, where the server's grid used to be empty and sampling crashed)."""
    T = 1000
    for t_c in range(T + 1):
        cut = Cut(t_c, T, mode, steps)
        try:
            server, client = cut.sampling_grids()
        except ValueError:  # too few steps for both sides: only 1 step with a hand-over inside
            assert steps == 0 or steps < 2
            continue
        h = cut.handover
        assert 0 <= h <= T and (h == t_c or mode == "reference")
        for grid in (server, client):
            assert all(a > b for a, b in zip(grid, grid[1:]))
        assert not server or (server[0] == T and server[-1] == h)
        assert not client or (client[0] == h and client[-1] == 0)
        assert server or client
        assert bool(client) == (h > 0)
        assert cut.uses_server == (t_c < T)


@pytest.mark.parametrize("mode", ["markov", "reference"])
def test_sampling_runs_to_t_0_for_every_cut(mode):
    """Both sides' loops with a tiny eps model, every t_c of T = 20: the server's part
    (possibly none) then the client's, ending at t = 0 with finite images."""
    from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule

    T = 20
    diffusion = GaussianDiffusion(beta_schedule("linear", T))

    def eps(x, t):
        return 0.1 * x

    for t_c in range(T + 1):
        cut = Cut(t_c, T, mode)
        server, client = cut.sampling_grids()
        g = torch.Generator().manual_seed(t_c)
        x = torch.randn(3, 1, 4, 4, generator=g)
        x = diffusion.p_sample_loop(eps, x, server, a=cut.server_anchor, clip=cut.server_clips, generator=g)
        x = diffusion.p_sample_loop(eps, x, client, a=0, clip=True, generator=g) if client else x.clamp(-1, 1)
        assert x.shape == (3, 1, 4, 4) and torch.isfinite(x).all() and x.abs().max() <= 1


def test_a_reference_run_that_hands_over_at_T_trains_and_samples(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.95, 0.5], rounds=2)  # T = 20: t_c 19, hand-over 20
    raw["diffusion"]["split"] = "reference"
    assert Cut(19, 20, "reference").handover == 20
    run_in_process(from_dict(raw), resume=False)
    with h5py.File(tmp_path / "out/results.h5") as f:
        assert f["clients/c0/samples/images"].shape == (4, 1, 8, 8)


def test_one_clipping_rule_the_server_clips_only_when_it_estimates_x0(tmp_path, shards):
    """At c = 0 the server's estimate is x_0 and is clipped as the client's is: its
    hand-over (x_0 itself) stays in [-1, 1]; above the cut it estimates x_c, unclipped."""
    assert Cut(0, 20).server_clips and not Cut(4, 20).server_clips and not Cut(4, 20, "reference").server_clips
    raw = tiny_config(shards, tmp_path / "out", [0.0, 0.5], rounds=2)
    raw["clients"][0]["allow_centralized"] = True
    run_in_process(from_dict(raw), resume=False)
    with h5py.File(tmp_path / "out/results.h5") as f:
        assert np.abs(f["clients/c0/samples/x_handover"][()]).max() <= 1.0


@pytest.mark.slow
def test_a_clients_server_samples_do_not_depend_on_the_batch_or_its_neighbours(tmp_path, shards):
    """The server samples each request from its own client's streams: the same x_h for
    c0 with sample_batch 2 or 64, and with or without c1 (same cut) beside it."""
    from collafuse_hpc.roles.server import NOISE_BLOCK, Server
    from collafuse_hpc.runtime.wire import Kind, one_client

    assert NOISE_BLOCK > 2
    got = {}
    for batch, clients in ((64, [0, 1]), (2, [0, 1]), (64, [0])):
        cfg = from_dict(tiny_config(shards, tmp_path / "out", [0.5, 0.5], sample_batch=batch))
        server = Server(cfg, [0, 1], torch.device("cpu"))
        requests = {k: one_client(Kind.SAMPLE_REQUEST, 0, k, 10, 70 if k == 0 else 5) for k in clients}
        got[(batch, len(clients))] = server.sample(requests)[0].payload
    assert got[(64, 2)].shape == (70, 1, 8, 8)
    torch.testing.assert_close(got[(64, 2)], got[(2, 2)])
    torch.testing.assert_close(got[(64, 2)], got[(64, 1)])


@pytest.mark.parametrize("mode", ["markov", "reference"])
def test_the_server_trains_on_x_t_from_x_c_with_its_anchor(tmp_path, shards, mode):
    """What the server's model sees: x_t = sqrt(abar_{t|a}) x_c + sqrt(1 - abar_{t|a}) eps
    with a = t_c (markov) or 0 (reference: x_c taken as clean), t in t_c+1..T, the
    products taken here from the betas themselves."""
    from collafuse_hpc.diffusion.gaussian import beta_schedule
    from collafuse_hpc.roles.server import Server
    from collafuse_hpc.runtime.wire import Kind, one_client

    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5])
    raw["diffusion"]["split"] = mode
    cfg = from_dict(raw)
    server = Server(cfg, [0, 1], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x_c = torch.randn(6, 1, 8, 8, generator=g)
    stream = torch.Generator()
    stream.set_state(server.streams[1].get_state())  # the draws the server makes for client 1
    u, noise = torch.rand(6, generator=stream), torch.randn(6, 1, 8, 8, generator=stream)
    seen = {}

    def eps_model(ema, t_c, y):
        def eps(x, t):
            seen.update(x=x.detach().clone(), t=t.clone())
            return torch.zeros_like(x, requires_grad=True)

        return eps

    server.eps_model = eps_model
    server._losses([(1, one_client(Kind.TRAIN, 0, 1, 10, 6, x_c))])
    T, t_c, a = 20, 10, (10 if mode == "markov" else 0)
    t = t_c + 1 + (u * (T - t_c)).long().clamp(max=T - 1 - t_c)
    assert torch.equal(seen["t"], t) and int(t.min()) > t_c and int(t.max()) <= T
    betas = np.asarray(beta_schedule("linear", T), dtype=np.float64)
    abar = torch.tensor([np.prod(1 - betas[a:step]) for step in t.tolist()]).view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"].double(), abar.sqrt() * x_c + (1 - abar).sqrt() * noise, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "aggregate,expected", [("concat", [[0, 1], "step"]), ("sequential", [[0], "step", [1], "step"])]
)
def test_aggregation_steps_in_client_order(tmp_path, shards, aggregate, expected):
    from collafuse_hpc.roles.server import Server
    from collafuse_hpc.runtime.wire import Kind, one_client

    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5])
    raw["server"]["aggregate"] = aggregate
    server = Server(from_dict(raw), [0, 1], torch.device("cpu"))
    calls = []
    losses, step = server._losses, server.net.step
    server._losses = lambda group: calls.append([k for k, _ in group]) or losses(group)
    server.net.step = lambda loss, **kw: calls.append("step") or step(loss, **kw)
    msgs = {k: one_client(Kind.TRAIN, 0, k, t_c, 6, torch.randn(6, 1, 8, 8)) for k, t_c in ((1, 10), (0, 5))}
    server.train_round(msgs, lambda k, m: None)
    assert calls == expected


def test_no_server_forward_pass_exceeds_sample_batch(tmp_path, shards):
    """Noise blocks of 64 images keep a client's samples independent of the batch size;
    the forward passes still take at most run.sample_batch images (a memory bound)."""
    from collafuse_hpc.roles.server import Server
    from collafuse_hpc.runtime.wire import Kind, one_client

    cfg = from_dict(tiny_config(shards, tmp_path / "out", [0.5, 0.5], sample_batch=3))
    server = Server(cfg, [0, 1], torch.device("cpu"))
    sizes, forward = [], server.net.forward
    server.net.forward = lambda x, t, *a, **kw: sizes.append(len(x)) or forward(x, t, *a, **kw)
    server.sample({0: one_client(Kind.SAMPLE_REQUEST, 0, 0, 10, 70)})
    assert sizes and max(sizes) == 3
