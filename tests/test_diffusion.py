"""The diffusion math against the spec's formulas and numerical checks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule


@pytest.fixture(params=["linear", "cosine"])
def diffusion(request) -> GaussianDiffusion:
    return GaussianDiffusion(beta_schedule(request.param, 100))


def test_linear_schedule_matches_ddpm_endpoints():
    betas = beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(betas) > 0)


def test_alphas_cumprod_start_at_one_and_decrease(diffusion):
    abar = diffusion.alphas_cumprod
    assert abar[0] == 1.0 and len(abar) == diffusion.num_timesteps + 1
    assert np.all(np.diff(abar) < 0) and abar[-1] > 0


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(ValueError, match="linear.*cosine"):
        beta_schedule("quadratic", 10)


def _stats(diffusion, x0, sample):
    draws = torch.stack([sample() for _ in range(4000)])  # (draws, 1, D)
    return draws.mean(0), draws.var(0)


def test_q_sample_has_the_marginal(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, 16).reshape(1, 16).double()
    t = torch.tensor([40])
    mean, var = _stats(
        diffusion, x0, lambda: diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    )
    abar = diffusion.alphas_cumprod[40]
    assert torch.allclose(mean, np.sqrt(abar) * x0, atol=0.05)
    assert torch.allclose(var, torch.full_like(var, 1 - abar), atol=0.05)


@pytest.mark.parametrize("t_c,t", [(10, 11), (20, 70), (0, 50), (30, 100)])
def test_sub_chain_from_x_c_has_the_full_chain_marginal(diffusion, t_c, t):
    """Markov split: continuing from x_c with abar_{t|c} gives q(x_t | x_0)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.linspace(-1, 1, 16).reshape(1, 16).double()

    def two_stage():
        x_c = diffusion.q_sample(x0, torch.tensor([t_c]), torch.randn(x0.shape, generator=g, dtype=x0.dtype))
        return diffusion.q_sample(x_c, torch.tensor([t]), torch.randn(x0.shape, generator=g, dtype=x0.dtype), a=t_c)

    mean, var = _stats(diffusion, x0, two_stage)
    abar = diffusion.alphas_cumprod[t]
    assert torch.allclose(mean, np.sqrt(abar) * x0, atol=0.05)
    assert torch.allclose(var, torch.full_like(var, 1 - abar), atol=0.05)


def test_posterior_coefficients_match_ddpm_for_anchor_zero(diffusion):
    b, al, ab = diffusion.betas, diffusion.alphas, diffusion.alphas_cumprod
    x_a, x_t = torch.ones(1, 1).double(), torch.zeros(1, 1).double()
    for t in (1, 2, 50, 100):
        mean_a, var = diffusion.q_posterior(x_a, x_t, torch.tensor([t]), torch.tensor([t - 1]))
        mean_t, _ = diffusion.q_posterior(x_t, x_a, torch.tensor([t]), torch.tensor([t - 1]))
        assert mean_a.item() == pytest.approx(b[t] * np.sqrt(ab[t - 1]) / (1 - ab[t]))
        assert mean_t.item() == pytest.approx((1 - ab[t - 1]) * np.sqrt(al[t]) / (1 - ab[t]))
        assert var.item() == pytest.approx(b[t] * (1 - ab[t - 1]) / (1 - ab[t]))


def test_posterior_coefficients_match_the_spec_for_the_sub_chain(diffusion):
    b, al, ab = diffusion.betas, diffusion.alphas, diffusion.alphas_cumprod
    t_c, t = 20, 35
    abar_t, abar_s = ab[t] / ab[t_c], ab[t - 1] / ab[t_c]
    x_a, x_t = torch.ones(1, 1).double(), torch.zeros(1, 1).double()
    mean_a, var = diffusion.q_posterior(x_a, x_t, torch.tensor([t]), torch.tensor([t - 1]), a=t_c)
    mean_t, _ = diffusion.q_posterior(x_t, x_a, torch.tensor([t]), torch.tensor([t - 1]), a=t_c)
    assert mean_a.item() == pytest.approx(np.sqrt(abar_s) * b[t] / (1 - abar_t))
    assert mean_t.item() == pytest.approx(np.sqrt(al[t]) * (1 - abar_s) / (1 - abar_t))
    assert var.item() == pytest.approx((1 - abar_s) / (1 - abar_t) * b[t])


@pytest.mark.parametrize("a,s,t", [(0, 30, 60), (20, 21, 90), (20, 40, 41)])
def test_strided_posterior_preserves_the_marginal(diffusion, a, s, t):
    """x_t ~ q(x_t|x_a), then x_s ~ q(x_s|x_t, x_a) must be distributed as q(x_s|x_a)."""
    g = torch.Generator().manual_seed(2)
    x_a = torch.linspace(-1, 1, 16).reshape(1, 16).double()

    def draw():
        x_t = diffusion.q_sample(x_a, torch.tensor([t]), torch.randn(x_a.shape, generator=g, dtype=x_a.dtype), a)
        mean, var = diffusion.q_posterior(x_a, x_t, torch.tensor([t]), torch.tensor([s]), a)
        return mean + var.sqrt() * torch.randn(x_a.shape, generator=g, dtype=x_a.dtype)

    mean, var = _stats(diffusion, x_a, draw)
    abar = diffusion.alphas_cumprod[s] / diffusion.alphas_cumprod[a]
    assert torch.allclose(mean, np.sqrt(abar) * x_a, atol=0.05)
    assert torch.allclose(var, torch.full_like(var, 1 - abar), atol=0.05)


def test_final_server_step_returns_x_c_hat_without_noise_or_clipping(diffusion):
    t_c = 30
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * 2
    eps = torch.randn_like(x)
    out = diffusion.p_sample_loop(lambda x_, t: eps, x, [t_c + 1, t_c], a=t_c, clip=False)
    expected = diffusion.predict_anchor(x, torch.full((3,), t_c + 1), eps, a=t_c)
    assert torch.allclose(out, expected)
    assert expected.abs().max() > 1  # a noised image: not clipped


def test_oracle_model_recovers_the_anchor_over_a_strided_server_chain(diffusion):
    """With the true noise, the reverse sub-chain T..t_c lands exactly on x_c."""
    t_c, T = 25, diffusion.num_timesteps
    g = torch.Generator().manual_seed(3)
    x_c = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)

    def oracle(x_t, t):
        abar = diffusion._bcast(diffusion.abar(t, t_c), x_t)
        return (x_t - abar.sqrt() * x_c) / (1 - abar).sqrt()

    x_T = diffusion.q_sample(x_c, torch.full((2,), T), torch.randn(x_c.shape, generator=g, dtype=x_c.dtype), a=t_c)
    out = diffusion.p_sample_loop(oracle, x_T, [T, 80, 51, 26, t_c], a=t_c, clip=False, generator=g)
    assert torch.allclose(out, x_c, atol=1e-9)


def test_training_losses_are_per_example(diffusion):
    x = torch.zeros(5, 1, 4, 4)
    noise = torch.ones_like(x)
    losses = diffusion.training_losses(lambda x_t, t: torch.zeros_like(x_t), x, torch.full((5,), 10), noise)
    assert losses.shape == (5,) and torch.allclose(losses, torch.ones(5))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("a,s,t", [(0, 30, 60), (20, 21, 90), (20, 40, 41)])
def test_ddim_step_preserves_the_marginal(diffusion, a, s, t, eta):
    """x_t ~ q(x_t|x_a), one DDIM step with the true x_a: x_s ~ q(x_s|x_a) for every eta."""
    g = torch.Generator().manual_seed(4)
    x_a = torch.linspace(-1, 1, 16).reshape(1, 16).double()

    def draw():
        x_t = diffusion.q_sample(x_a, torch.tensor([t]), torch.randn(x_a.shape, generator=g, dtype=x_a.dtype), a)
        noise = torch.randn(x_a.shape, generator=g, dtype=x_a.dtype)
        return diffusion.ddim_step(x_t, x_a, torch.tensor([t]), torch.tensor([s]), a, eta, noise)

    mean, var = _stats(diffusion, x_a, draw)
    abar = diffusion.alphas_cumprod[s] / diffusion.alphas_cumprod[a]
    assert torch.allclose(mean, np.sqrt(abar) * x_a, atol=0.05)
    assert torch.allclose(var, torch.full_like(var, 1 - abar), atol=0.05)


def test_ddim_with_eta_one_has_the_ddpm_posterior():
    diffusion = GaussianDiffusion(beta_schedule("linear", 100))
    x_a, x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t, s = torch.full((3,), 70), torch.full((3,), 45)
    mean, var = diffusion.q_posterior(x_a, x_t, t, s, a=20)
    assert torch.allclose(diffusion.ddim_step(x_t, x_a, t, s, 20, 1.0, None), mean)
    noise = torch.randn_like(x_t)
    assert torch.allclose(diffusion.ddim_step(x_t, x_a, t, s, 20, 1.0, noise), mean + var.sqrt() * noise)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_an_oracle_recovers_x_c_on_the_server_and_x_0_on_the_client(diffusion, eta):
    """The split chain with DDIM steps: T..t_c (anchor t_c) lands on x_c, t_c..0 (anchor 0) on x_0."""
    t_c, T = 25, diffusion.num_timesteps
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_c = diffusion.q_sample(x0, torch.full((2,), t_c), torch.randn(x0.shape, generator=g, dtype=x0.dtype))

    def oracle(anchor, x_anchor):
        def eps(x_t, t):
            abar = diffusion._bcast(diffusion.abar(t, anchor), x_t)
            return (x_t - abar.sqrt() * x_anchor) / (1 - abar).sqrt()

        return eps

    x_T = diffusion.q_sample(x_c, torch.full((2,), T), torch.randn(x0.shape, generator=g, dtype=x0.dtype), a=t_c)
    got_c = diffusion.p_sample_loop(
        oracle(t_c, x_c), x_T, [T, 80, 51, 26, t_c], a=t_c, clip=False, generator=g, eta=eta
    )
    assert torch.allclose(got_c, x_c, atol=1e-9)
    got_0 = diffusion.p_sample_loop(oracle(0, x0), got_c, [t_c, 17, 9, 0], a=0, clip=True, generator=g, eta=eta)
    assert torch.allclose(got_0, x0, atol=1e-9)


def test_ddim_eta_zero_is_deterministic_and_draws_no_noise():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 50))
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    state = g.get_state()
    a = diffusion.p_sample_loop(lambda x_, t: 0.1 * x_, x, [50, 30, 10, 0], generator=g, eta=0.0)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(a, diffusion.p_sample_loop(lambda x_, t: 0.1 * x_, x, [50, 30, 10, 0], eta=0.0))


@settings(max_examples=200, deadline=None)
@given(
    schedule=st.sampled_from(["linear", "cosine"]),
    t=st.integers(1, 100),
    anchor=st.integers(0, 99),
    seed=st.integers(0, 2**31 - 1),
)
def test_q_sample_is_the_closed_form_for_every_step_and_anchor(schedule, t, anchor, seed):
    """x_t = sqrt(abar_{t|a}) x_a + sqrt(1 - abar_{t|a}) eps with abar_{t|a} the product of
    (1 - beta_i) over a < i <= t, from the betas themselves: exact for fixed noise (an
    off-by-one step or anchor fails here; a Monte Carlo check of the marginal does not)."""
    a = min(anchor, t - 1)
    betas = np.asarray(beta_schedule(schedule, 100), dtype=np.float64)  # beta_1..beta_T
    abar = np.prod(1.0 - betas[a:t])
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g)
    noise = noise.double()
    want = np.sqrt(abar) * x + np.sqrt(1 - abar) * noise
    got = GaussianDiffusion(beta_schedule(schedule, 100)).q_sample(x, torch.tensor([t, t]), noise, a)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
