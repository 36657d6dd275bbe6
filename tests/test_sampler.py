"""SPEC §6: the reference's schedule, CFG with the right negative inputs, CPU-generator noise."""

import numpy as np
import pytest
import torch

from bindweave.sampling.sampler import Step, denoise, guided_velocity, initial_noise, make_scheduler
from bindweave.settings.sampling import SamplerSettings

SPEC_TIMESTEPS = [
    999, 992, 985, 978, 971, 963, 956, 948, 939, 931, 922, 913, 904, 894, 884, 874, 864, 853, 841,
    829, 817, 805, 792, 778, 764, 749, 734, 718, 701, 684, 666, 647, 627, 606, 585, 562, 538, 512,
    486, 458, 428, 396, 363, 327, 290, 249, 206, 160, 111, 57,
]


def test_timesteps_and_sigmas_are_the_reference_schedule():
    scheduler = make_scheduler(SamplerSettings())
    assert scheduler.timesteps.tolist() == SPEC_TIMESTEPS
    sigmas = scheduler.sigmas.double().numpy()
    np.testing.assert_allclose(sigmas[:3], [0.9996665, 0.9929075, 0.9859633], atol=1e-6)
    np.testing.assert_allclose(sigmas[-2:], [0.0576368, 0.0], atol=1e-6)
    # Independent: sigma = 3u / (1 + 2u) on the unshifted grid.
    u = (1 - np.linspace(1, 1 / 1000, 51))[::-1][:-1]
    np.testing.assert_allclose(sigmas[:-1], 3 * u / (1 + 2 * u), rtol=1e-6)


def test_cfg_combines_positive_and_negative_predictions():
    seen = []

    def predict(latents, step):
        seen.append(step)
        return torch.full_like(latents, 2.0 if step.side == "positive" else -1.0)

    step = Step(index=3, num_steps=50, timestep=torch.tensor([999]))
    velocity = guided_velocity(predict, 5.0)(torch.zeros(1, 2), step)
    assert [(s.side, s.index, s.num_steps, int(s.timestep)) for s in seen] == [("positive", 3, 50, 999),
                                                                              ("negative", 3, 50, 999)]
    torch.testing.assert_close(velocity, torch.full((1, 2), -1.0 + 5.0 * (2.0 + 1.0)))


def test_the_predictor_sees_each_step_index_and_timestep():
    """The step context reaches the predictor (the seam for step caches and per-step progress)."""
    seen = []

    def predict(latents, step):
        seen.append((step.index, step.num_steps, int(step.timestep), step.side))
        return torch.zeros_like(latents)

    scheduler = make_scheduler(SamplerSettings(num_steps=4))
    denoise(torch.zeros(1, 2), scheduler, guided_velocity(predict, 5.0))
    assert [entry[0] for entry in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {entry[1] for entry in seen} == {4} and [entry[3] for entry in seen[:2]] == ["positive", "negative"]
    assert [entry[2] for entry in seen[::2]] == [int(t) for t in scheduler.timesteps]


def test_noise_is_cpu_generator_bf16_and_seeded():
    a, b, c = initial_noise((1, 16, 2, 4, 4), 1234), initial_noise((1, 16, 2, 4, 4), 1234), initial_noise((1, 16, 2, 4, 4), 7)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and not torch.equal(a, c)
    expected = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(1234), dtype=torch.bfloat16)
    assert torch.equal(a, expected)


def test_denoise_follows_the_scheduler_to_the_clean_sample():
    """With the exact flow velocity (noise - x0) the sampler must land on x0 at sigma 0."""
    torch.manual_seed(0)
    clean = torch.randn(1, 4, 3)
    noise = torch.randn(1, 4, 3)
    velocity = lambda latents, step: noise - clean  # noqa: E731
    result = denoise(noise, make_scheduler(SamplerSettings(num_steps=10)), velocity)
    # Not exact: the first sigma is 0.99967, so the start is not exactly on the noise line.
    torch.testing.assert_close(result, clean, atol=2e-3, rtol=0)


@pytest.mark.parametrize("steps", [4, 8])
def test_fewer_steps_keep_the_same_grid_rule(steps):
    scheduler = make_scheduler(SamplerSettings(num_steps=steps))
    assert len(scheduler.timesteps) == steps and int(scheduler.timesteps[0]) == 999
