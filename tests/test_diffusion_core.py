"""The shared diffusion core: schedules, the DDPM objective and DDIM sampling, against
hand-computed values (float64 where the comparison is exact in real arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from cogvideo.diffusion.guidance import guided_prediction
from cogvideo.diffusion.objective import DiffusionObjective, objective_for
from cogvideo.diffusion.sampling import ddim_sample
from cogvideo.diffusion.schedule import NoiseSchedule

F64_TOL = 1e-12  # float64 arithmetic of a few dozen operations: ~1e-15 relative; real errors are >= 1e-3


def test_the_default_schedule_is_latent_diffusions_and_training_and_sampling_share_it():
    schedule = NoiseSchedule()
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2  # LDM's
    assert torch.allclose(schedule.ddpm().betas.double(), betas, rtol=1e-6, atol=0)
    abar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(schedule.alphas_cumprod().double(), abar, rtol=1e-5, atol=0)
    ddim = schedule.ddim()
    assert torch.equal(ddim.alphas_cumprod, schedule.ddpm().alphas_cumprod)
    ddim.set_timesteps(50)  # LDM's DDIM steps: 981, 961, ..., 1; the last step's previous alpha is abar_0
    assert ddim.timesteps.tolist() == list(range(981, 0, -20))
    assert float(ddim.final_alpha_cumprod) == float(ddim.alphas_cumprod[0])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"beta_start": 0.02, "beta_end": 0.01}, "need 0 < start < end < 1"),
        ({"beta_schedule": "cosine"}, "is not one of"),
        ({"prediction_type": "x0"}, "is not one of"),
        ({"num_train_timesteps": 1}, "needs >= 2"),
        ({"timestep_spacing": "linspace"}, "is not one of"),
        ({"zero_terminal_snr": True}, "needs prediction_type v_prediction or sample"),
    ],
)
def test_a_bad_schedule_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule(**bad).validate("model.schedule")


def test_zero_terminal_snr_is_lin_et_als_rescaling_and_its_last_step_is_pure_noise():
    """Lin et al. 2024, Algorithm 1 by hand: sqrt(abar) shifted so that its last value is 0 and
    scaled so that its first is unchanged. Training's last step then carries nothing of x0, and
    trailing DDIM starts sampling there (LDM's schedule keeps 0.07 x0 at t = 999, 0.10 at the
    first of 15 leading steps: the noise decides what the condition should)."""
    schedule = NoiseSchedule(
        prediction_type="v_prediction", zero_terminal_snr=True, timestep_spacing="trailing"
    )
    root = NoiseSchedule().alphas_cumprod().double().sqrt()
    by_hand = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    assert torch.allclose(schedule.alphas_cumprod().double(), by_hand, rtol=1e-5, atol=1e-7)
    objective = DiffusionObjective(schedule)
    x0, noise = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    last = torch.full((2,), 999)
    assert torch.equal(objective.noisy(x0, noise, last), noise)  # no signal left at t = T - 1
    v = objective.target(x0, noise, last)
    assert torch.allclose(objective.predicted_x0(noise, v, last), x0, rtol=0, atol=F64_TOL)
    ddim = schedule.ddim()
    assert torch.equal(ddim.alphas_cumprod, schedule.ddpm().alphas_cumprod)
    ddim.set_timesteps(15)
    assert ddim.timesteps[0] == 999 and ddim.timesteps[-1] == 66  # trailing: from the pure-noise step


def _objective(kind: str) -> DiffusionObjective:
    return DiffusionObjective(NoiseSchedule(prediction_type=kind))


def test_noising_and_the_one_step_estimate_are_the_forward_process_and_its_inverse():
    objective = _objective("epsilon")
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    abar = objective.alphas_cumprod[t].reshape(3, 1, 1, 1)
    by_hand = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # Eq. 4 (the paper's Eq. 5 drops the root)
    noisy = objective.noisy(x0, noise, t)
    assert torch.allclose(noisy, by_hand, rtol=1e-6, atol=1e-6)  # diffusers keeps alphas in float32
    assert torch.allclose(objective.predicted_x0(noisy, noise, t), x0, rtol=0, atol=1e-5)
    # planted: the paper's Eq. 9 as printed, (1 - abar) where the square root belongs, misses x0
    printed = noisy / abar.sqrt() - (1 - abar) / abar.sqrt() * noise
    assert not torch.allclose(printed, x0, atol=1e-2)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_target_is_the_prediction_type_and_inverts_to_x0(kind):
    objective = _objective(kind)
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 200, 640, 990])
    abar = objective.alphas_cumprod[t].reshape(4, 1, 1, 1)
    target = objective.target(x0, noise, t)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[
        kind
    ]
    assert torch.allclose(target, expected, rtol=1e-6, atol=1e-6)
    noisy = objective.noisy(x0, noise, t)
    assert torch.allclose(objective.predicted_x0(noisy, target, t), x0, rtol=0, atol=1e-5)
    assert torch.equal(objective.loss(target, target), torch.zeros(4))
    assert torch.allclose(objective.loss(target + 2, target), torch.full((4,), 4.0, dtype=torch.float32))


def test_draws_follow_the_generator_and_cover_every_timestep():
    objective = objective_for(NoiseSchedule())
    x0 = torch.zeros(20000, 1)
    t1, n1 = objective.draw(x0, torch.Generator().manual_seed(3))
    t2, n2 = objective.draw(x0, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and torch.equal(n1, n2)
    assert int(t1.min()) == 0 and int(t1.max()) == 999
    assert abs(float(n1.std()) - 1) < 5 / math.sqrt(2 * 20000)  # 5 standard errors of a std


def _point_mass_epsilon(schedule: NoiseSchedule, target: torch.Tensor):
    """The exact noise prediction when every sample is `target`: eps = (x_t - sqrt(abar) c) / sqrt(1 - abar)."""
    abar = schedule.alphas_cumprod().double()

    def predict(x, t):
        return (x - abar[t].sqrt() * target) / (1 - abar[t]).sqrt()

    return predict


def _ddim_end(schedule: NoiseSchedule, target, noise, first: int):
    abar = schedule.alphas_cumprod().double()
    eps = (noise - abar[first].sqrt() * target) / (1 - abar[first]).sqrt()
    return abar[0].sqrt() * target + (1 - abar[0]).sqrt() * eps


def test_ddim_with_the_exact_noise_prediction_lands_on_the_data_point():
    """For a point mass c the exact epsilon is constant along the deterministic DDIM path (its
    first value, from x_T), so DDIM ends at LDM's last level, abar_0 (not 1):
    sqrt(abar_0) c + sqrt(1 - abar_0) eps_T."""
    schedule = NoiseSchedule()
    target = torch.tensor([[0.5, -1.25, 2.0]], dtype=torch.float64)
    noise = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(_point_mass_epsilon(schedule, target), noise, schedule.ddim(), steps=25)
    assert torch.allclose(out, _ddim_end(schedule, target, noise, first=961), rtol=0, atol=1e-6)
    assert torch.allclose(out, target, rtol=0, atol=0.1)  # and that is the data point up to 3 % of eps


def test_one_ddim_step_is_the_published_update():
    """x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps (Song et al., Eq. 12 with eta 0)."""
    schedule = NoiseSchedule()
    scheduler = schedule.ddim()
    scheduler.set_timesteps(10)
    t, prev = scheduler.timesteps[:2].tolist()
    abar = schedule.alphas_cumprod().double()
    x = torch.randn(2, 5, dtype=torch.float64)
    eps = torch.randn(2, 5, dtype=torch.float64)
    x0_hat = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
    by_hand = abar[prev].sqrt() * x0_hat + (1 - abar[prev]).sqrt() * eps
    step = scheduler.step(eps, t, x).prev_sample
    assert torch.allclose(step, by_hand, rtol=0, atol=1e-6)


def test_ddim_is_deterministic_given_its_noise_and_generator():
    schedule = NoiseSchedule()
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))

    def predict(x, t):
        return torch.tanh(x @ weight) * (t / 1000)

    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    first = ddim_sample(predict, noise, schedule.ddim(), steps=8)
    assert torch.equal(first, ddim_sample(predict, noise, schedule.ddim(), steps=8))
    stochastic = [
        ddim_sample(predict, noise, schedule.ddim(), 8, eta=1.0, generator=torch.Generator().manual_seed(s))
        for s in (5, 5, 6)
    ]
    assert torch.equal(stochastic[0], stochastic[1])
    assert not torch.allclose(stochastic[0], stochastic[2])  # eta > 0 draws the generator's noise
    assert not torch.allclose(first, stochastic[0])


def test_guided_ddim_moves_past_the_conditional_point_by_the_scale():
    """With exact point-mass predictions per condition, the guided prediction of scale s is the
    exact one of the point uncond + s * (cond - uncond), where DDIM then lands."""
    schedule = NoiseSchedule()
    points = {
        1.0: torch.tensor([1.0, 0.0], dtype=torch.float64),
        0.0: torch.tensor([0.0, 2.0], dtype=torch.float64),
    }
    abar = schedule.alphas_cumprod().double()

    def predict_given(x, cond, t):
        target = torch.stack([points[float(c)] for c in cond])
        return (x - abar[t].sqrt() * target) / (1 - abar[t]).sqrt()

    noise = torch.randn(1, 2, dtype=torch.float64)
    cond, uncond = torch.tensor([1.0]), torch.tensor([0.0])
    out = ddim_sample(
        lambda x, t: guided_prediction(lambda xx, c: predict_given(xx, c, t), x, cond, uncond, 3.0),
        noise,
        schedule.ddim(),
        steps=20,
    )
    expected = points[0.0] + 3.0 * (points[1.0] - points[0.0])
    assert torch.allclose(out, _ddim_end(schedule, expected, noise, first=951), rtol=0, atol=1e-6)
