"""Tests of diffusion.py: the forward process (Eq. 1-2), the targets (Eq. 3 and its variants), the samplers."""

import math

import pytest
import torch

from diffusion import Diffusion


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_has_the_mean_and_variance_of_eq1(schedule):
    d = Diffusion(schedule=schedule)
    ab = d.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and 0.99 < ab[0] < 1 and ab[-1] < 0.01  # monotone, from clean to noise
    x0 = torch.linspace(-2, 2, 50)
    for t in (0, 300, 999):
        noise = torch.randn(20_000, 50, generator=torch.Generator().manual_seed(t))
        x_t = d.q_sample(x0.expand(20_000, 50), torch.full((20_000,), t), noise)
        assert torch.allclose(x_t.mean(0), ab[t].sqrt() * x0, atol=0.03)
        assert torch.allclose(x_t.var(0), (1 - ab[t]).expand(50), rtol=0.05, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_every_target_gives_back_x0_and_eps(prediction):
    d = Diffusion(prediction=prediction)
    x0, noise, t = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4), torch.randint(1, 999, (8,))
    x_t = d.q_sample(x0, t, noise)
    got_x0, got_eps = d.split(x_t, t, d.target(x0, noise, t))
    assert torch.allclose(got_x0, x0, atol=1e-3) and torch.allclose(got_eps, noise, atol=1e-3)
    assert torch.allclose(d.x0_from_eps(x_t, t, noise), x0, atol=1e-3)
    assert torch.equal(d.loss_weight(t), torch.ones(8))  # no min-SNR: Eq. 3 as it stands
    assert Diffusion(**d.config()).prediction == prediction  # what a checkpoint stores rebuilds the same process


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights_count_every_target_as_the_capped_snr_times_the_x0_error(prediction):
    """Min-SNR-gamma (Hang et al.) weighs a sample's x0 error by min(SNR, gamma). A model predicting eps or v makes
    its x0 error times SNR or SNR + 1 in its own target, so its weight must undo that: whatever the target, weight x
    target error = min(SNR, gamma) x x0 error. Checked at timesteps below and above the cap."""
    d, gamma = Diffusion(prediction=prediction), 5.0
    t = torch.tensor([20, 100, 150, 990])  # SNR about 160, 8.5, 3.7 and 5e-5
    x0, noise, error = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    x_t = d.q_sample(x0, t, noise)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat = x0 + error  # a wrong x0; the eps that goes with it on the same x_t
    eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    per_sample = lambda a, b: (a - b).pow(2).flatten(1).mean(1)  # noqa: E731
    target_error = per_sample(d.target(x0_hat, eps_hat, t), d.target(x0, noise, t))
    snr = (ab / (1 - ab)).flatten()
    assert (snr[:2] > gamma).all() and (snr[2:] < gamma).all()
    want = snr.clamp(max=gamma) * per_sample(x0_hat, x0)
    assert torch.allclose(d.loss_weight(t, gamma) * target_error, want, rtol=1e-3)


def test_the_ddpm_sampler_draws_from_the_data_distribution_in_every_step():
    """DDPM's ancestral sampler adds fresh noise at each of its 1000 steps: with the ideal denoiser of Gaussian data
    N(mu, s^2) it draws samples of that mean and spread, unlike the deterministic DDIM's end points from the
    same start (those are an exact function of the starting noise)."""
    d, mu, s, calls = Diffusion(), 0.7, 0.3, []

    def ideal(x, t):
        calls.append(t[0].item())
        a, sigma2 = d._ab(t, x).sqrt(), 1 - d._ab(t, x)
        x0 = mu + a * s ** 2 * (x - a * mu) / (a ** 2 * s ** 2 + sigma2)
        return x0, (x - a * x0) / sigma2.sqrt()

    ddpm = d.sample(ideal, (4096,), 8, "ddpm", generator=torch.Generator().manual_seed(0))
    assert calls == list(range(999, -1, -1))  # every step, whatever steps says
    ddim = d.sample(ideal, (4096,), 50, "ddim", generator=torch.Generator().manual_seed(0))
    assert abs(ddpm.mean().item() - mu) < 0.02 and abs(ddpm.std().item() - s) < 0.02
    assert torch.corrcoef(torch.stack([ddpm, ddim]))[0, 1] < 0.9


def test_ddim_with_a_perfect_denoiser_returns_the_data():
    d = Diffusion(prediction="x0")
    x0 = torch.randn(2, 3, 4, 4)
    out = d.sample(lambda x, t: d.split(x, t, x0), x0.shape, 10, "ddim")
    assert torch.allclose(out, x0, atol=1e-4)


def test_dpm_solver_integrates_the_probability_flow_more_accurately_than_ddim():
    """Gaussian data x0 ~ N(mu, s^2): the ideal denoiser is closed-form, E[x0 | x_t] = mu + a s^2 (x_t - a mu) /
    (a^2 s^2 + sigma^2), and the probability-flow ODE keeps z = (x_t - a mu) / sqrt(a^2 s^2 + sigma^2), so the
    exact end of each path is mu + s z. At equal steps DPM-Solver++(2M) lands closer than DDIM, and both converge."""
    d, mu, s = Diffusion(), 0.7, 0.3

    def ideal(x, t):
        a, sigma2 = d._ab(t, x).sqrt(), 1 - d._ab(t, x)
        x0 = mu + a * s ** 2 * (x - a * mu) / (a ** 2 * s ** 2 + sigma2)
        return x0, (x - a * x0) / sigma2.sqrt()

    def error(sampler, steps):
        out = d.sample(ideal, (4096,), steps, sampler, generator=torch.Generator().manual_seed(0))
        x_T = torch.randn(4096, generator=torch.Generator().manual_seed(0))
        a, sigma2 = d.alphas_cumprod[999].sqrt(), 1 - d.alphas_cumprod[999]
        exact = mu + s * (x_T - a * mu) / (a ** 2 * s ** 2 + sigma2).sqrt()
        return (out - exact).abs().mean().item()

    for steps, ratio in ((10, 1.0), (25, 0.6), (50, 0.2)):  # (measured: 0.93, 0.54, 0.13)
        assert error("dpm++", steps) < ratio * error("ddim", steps), steps
    assert error("dpm++", 50) < 0.2 * error("dpm++", 25)  # second order: 4x less error for 2x the steps


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_more_sampling_steps_than_the_process_has_take_each_step_once(sampler):
    d = Diffusion(steps=3, prediction="x0")
    x0, calls = torch.randn(2, 3, 4, 4), []
    out = d.sample(lambda x, t: calls.append(t[0].item()) or d.split(x, t, x0), x0.shape, steps=8, sampler=sampler)
    assert calls == [2, 1, 0] and torch.isfinite(out).all()


def test_the_cosine_schedule_is_nichol_and_dhariwals_and_its_last_step_keeps_some_signal():
    """alpha_bar(t) = f((t + 1) / T) / f(0), f(s) = cos((s + 0.008) / 1.008 * pi / 2)^2, with each beta capped at
    0.999: uncapped, the last beta is 1, alpha_bar 0, and x0 from an eps prediction divides by zero there."""
    d = Diffusion(schedule="cosine")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 500, 998):
        assert d.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-6)
    assert d.alphas_cumprod[-1] > 0
    t, x = torch.tensor([999]), torch.randn(1, 2, 4, 3, 3)
    assert all(v.isfinite().all() for v in d.split(x, t, torch.randn_like(x)))


def test_ddim_draws_its_unused_noise_so_that_a_shared_generator_ends_where_it_always_did():
    """sample.windows passes one generator through a long video's windows: DDIM (eta 0) draws the initial noise
    and one noise per step, as ddpm does, so the next window starts from the same state whatever the sampler."""
    shape, g = (1, 2, 4, 3, 3), torch.Generator().manual_seed(0)
    Diffusion().sample(lambda x, t: (torch.zeros_like(x), x), shape, 4, "ddim", generator=g)
    reference = torch.Generator().manual_seed(0)
    for _ in range(1 + 4):
        torch.randn(shape, generator=reference)
    assert torch.equal(torch.randn(shape, generator=g), torch.randn(shape, generator=reference))
