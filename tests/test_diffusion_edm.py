"""EDM in the diffusion core (cogvideo/diffusion/edm.py): preconditioning, loss weight and the
training noise levels against hand-computed values; the samplers against the probability-flow
ODE of Gaussian data, whose exact denoiser and exact solution are known, and the stochastic
sampler against EDM's Algorithm 2 written out here."""

import math

import pytest
import torch

from cogvideo.diffusion import edm

EDM = edm.EDMConfig()  # sigma_data 0.5, P_mean -1.2, P_std 1.2, sigma 0.002 .. 80, rho 7
DATA_STD = 0.7  # the Gaussian data the sampler tests denoise


def test_preconditioning_matches_hand_computed_values():
    pre = edm.Preconditioner(EDM)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1)
    x, net = (
        torch.tensor([[1.0], [3.0]], dtype=torch.float64),
        torch.tensor([[2.0], [-1.0]], dtype=torch.float64),
    )
    # sigma 0.5: c_skip = 0.25 / 0.5 = 0.5, c_out = 0.25 / sqrt(0.5), c_in = 1 / sqrt(0.5)
    # sigma 2:   c_skip = 0.25 / 4.25,      c_out = 1 / sqrt(4.25),   c_in = 1 / sqrt(4.25)
    expected_d = [[0.5 * 1 + 0.25 / math.sqrt(0.5) * 2], [0.25 / 4.25 * 3 - 1 / math.sqrt(4.25)]]
    assert torch.allclose(
        pre.denoised(x, net, sigma), torch.tensor(expected_d, dtype=torch.float64), rtol=1e-12
    )
    expected_in = torch.tensor([[1 / math.sqrt(0.5)], [3 / math.sqrt(4.25)]], dtype=torch.float64)
    assert torch.allclose(pre.c_in(x, sigma), expected_in, rtol=1e-12)
    assert torch.allclose(pre.c_noise(sigma), torch.log(sigma) / 4, rtol=1e-12)


def test_x_prediction_is_the_network_output_and_its_weight_is_floored():
    """prediction="sample": D = F (c_skip 0, c_out 1) with EDM's c_in and c_noise; the weight
    lambda(max(sigma, weight_sigma_min)) (planted: EDM's mix or an unfloored weight fail)."""
    cfg = edm.EDMConfig(prediction="sample", weight_sigma_min=0.05)
    pre = edm.Preconditioner(cfg)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1)
    x, net = (
        torch.tensor([[1.0], [3.0]], dtype=torch.float64),
        torch.tensor([[2.0], [-1.0]], dtype=torch.float64),
    )
    assert torch.equal(pre.denoised(x, net, sigma), net)
    assert torch.allclose(pre.c_in(x, sigma), edm.Preconditioner(EDM).c_in(x, sigma), rtol=1e-12)
    # 0.01 -> floored to 0.05: (0.0025 + 0.25) / (0.0025 * 0.25) = 404; 1 -> 5 as unfloored
    weights = edm.loss_weight(cfg, torch.tensor([0.01, 1.0], dtype=torch.float64))
    assert torch.allclose(weights, torch.tensor([404.0, 5.0], dtype=torch.float64), rtol=1e-12)
    assert edm.EDMConfig(prediction="x").problems() and not cfg.problems()


def test_loss_weight_and_training_sigmas():
    sigma = torch.tensor([0.5, 1.0, 0.1], dtype=torch.float64)
    # (sigma^2 + 0.25) / (0.25 sigma^2): 0.5 -> 0.5 / 0.0625 = 8, 1 -> 5, 0.1 -> 0.26 / 0.0025 = 104
    assert torch.allclose(edm.loss_weight(EDM, sigma), torch.tensor([8.0, 5.0, 104.0], dtype=torch.float64))
    # EDM's point: the weight makes F's target unit-weighted, lambda * c_out^2 = 1
    c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
    assert torch.allclose(edm.loss_weight(EDM, sigma) * c_out**2, torch.ones(3, dtype=torch.float64))
    draws = edm.sample_sigmas(EDM, (20000,), torch.Generator().manual_seed(0)).log()
    se = 1.2 / math.sqrt(20000)
    assert abs(float(draws.mean()) + 1.2) < 5 * se and abs(float(draws.std()) - 1.2) < 5 * se * math.sqrt(2)
    again = edm.sample_sigmas(EDM, (20000,), torch.Generator().manual_seed(0)).log()
    assert torch.equal(draws, again)


def test_karras_sigmas_by_hand():
    sigmas = edm.karras_sigmas(EDM, 3)
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    expected = [80.0, (hi + 0.5 * (lo - hi)) ** 7, 0.002, 0.0]
    assert torch.allclose(sigmas, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def gaussian_denoiser(x, sigma):
    """Exact D(x; sigma) for data ~ N(0, DATA_STD^2): x * s^2 / (s^2 + sigma^2)."""
    s2 = DATA_STD**2
    return x * s2 / (s2 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


def exact_flow(x_start, sigma_start, sigma_end):
    """The probability-flow ODE's solution for Gaussian data: x scales with sqrt(s^2 + sigma^2)."""
    s2 = DATA_STD**2
    return x_start * math.sqrt(s2 + sigma_end**2) / math.sqrt(s2 + sigma_start**2)


def test_deterministic_heun_solves_the_flow_second_order_and_euler_first_order():
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    exact = exact_flow(x, 80.0, 0.0)

    def heun_error(steps):
        return float(
            (edm.sample_heun(gaussian_denoiser, x, edm.karras_sigmas(EDM, steps)) - exact).abs().max()
        )

    def euler_error(steps):
        return float((edm.sample_euler(gaussian_denoiser, x, EDM, steps) - exact).abs().max())

    # doubling the steps divides Heun's error by ~4 and Euler's by ~2 (orders 2 and 1)
    assert heun_error(32) < 0.35 * heun_error(16)
    assert 0.35 < euler_error(32) / euler_error(16) < 0.7
    assert heun_error(32) < 0.3 * euler_error(32)  # the correction step is what makes it second order


def test_stochastic_heun_is_edms_algorithm_2():
    """Churn, Euler step and Heun correction as EDM's Algorithm 2 writes them, with the same
    noise draws (the scheduler draws float32 normals of the sample's shape from the generator)."""
    churn = edm.Churn(s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003)
    steps = 6
    sigmas = edm.karras_sigmas(EDM, steps)
    x0 = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    got = edm.sample_heun(gaussian_denoiser, x0, sigmas, churn, torch.Generator().manual_seed(7))

    g, x = torch.Generator().manual_seed(7), x0.clone()
    for i in range(steps):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(40 / steps, math.sqrt(2) - 1) if 0.05 <= t <= 50 else 0.0
        eps = 1.003 * torch.randn(x.shape, generator=g).double()
        t_hat = t + gamma * t
        x_hat = x + math.sqrt(t_hat**2 - t**2) * eps
        d = (x_hat - gaussian_denoiser(x_hat, torch.full((2,), t_hat))) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if t_next > 0:
            d_next = (x - gaussian_denoiser(x, torch.full((2,), t_next))) / t_next
            x = x_hat + (t_next - t_hat) * (d + d_next) / 2
    assert torch.allclose(got, x, rtol=1e-5, atol=1e-6)
    plain = edm.sample_heun(gaussian_denoiser, x0, sigmas, None, torch.Generator().manual_seed(7))
    assert not torch.allclose(plain, x, rtol=1e-3)  # the churn is really applied


@pytest.mark.parametrize("steps", [1, 5])
def test_samplers_report_each_step(steps):
    seen = []
    x = torch.zeros(1, 2, dtype=torch.float64)
    edm.sample_euler(gaussian_denoiser, x, EDM, steps, on_step=lambda i, n: seen.append((i, n)))
    edm.sample_heun(
        gaussian_denoiser, x, edm.karras_sigmas(EDM, steps), on_step=lambda i, n: seen.append((i, n))
    )
    assert seen == [(i, steps) for i in range(1, steps + 1)] * 2
