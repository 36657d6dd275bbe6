"""Sampling for step-distilled models (bindweave/settings/sampling.py, bindweave/sampling/sampler.py):
LightX2V's step-distill schedule at explicit timesteps, and CFG off (one DiT forward per step)."""

from __future__ import annotations

import re

import pytest
import torch

from bindweave.app.config import compose_config, settings_of
from bindweave.errors import BindWeaveInputError
from bindweave.sampling.sampler import Step, denoise, guided_velocity, make_scheduler
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.settings.sampling import SamplerSettings, refuse_cfg_parallel_without_guidance
from bindweave.stages.coordinator import SingleProcess
from bindweave.stages.job import Stage3Job
from bindweave.stages.phases import generate_sample
from support.engines import build_models
from bindweave.stages.resume import changes, sample_recipe
from bindweave.testing.demo import demo_meta_with_hidden_states
from bindweave.io.inputs import read_meta
from parallel.cfg import parallel_guided_velocity

LIGHTX2V_STEPS = [1000, 750, 500, 250]  # configs/distill/wan_i2v_distill_4step_cfg.json: denoising_step_list
DISTILL = SamplerSettings(scheduler="step_distill", timesteps=LIGHTX2V_STEPS, flow_shift=5.0, guidance_scale=1.0)


def lightx2v_schedule(steps: list[int], shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """WanStepDistillScheduler.set_denoising_timesteps, written out: a 1000-entry sigma grid from 1
    towards 0, shifted, indexed at 1000 - t. Returns (timesteps, sigmas) in float32 as it keeps them."""
    grid = torch.linspace(1.0, 0.0, 1001)[:-1]
    grid = shift * grid / (1 + (shift - 1) * grid)
    index = [1000 - t for t in steps]
    return (grid * 1000)[index], grid[index]


def test_the_step_distill_schedule_is_lightx2vs():
    scheduler = make_scheduler(DISTILL)
    timesteps, sigmas = lightx2v_schedule(LIGHTX2V_STEPS, 5.0)
    torch.testing.assert_close(scheduler.timesteps, timesteps, atol=1e-4, rtol=0)
    torch.testing.assert_close(scheduler.sigmas[:-1], sigmas, atol=1e-6, rtol=0)
    assert scheduler.sigmas[-1] == 0  # the last step lands on the clean sample
    # The closed form, in float64: 5u / (1 + 4u) at u = t / 1000.
    expected = [5 * u / (1 + 4 * u) for u in (t / 1000 for t in LIGHTX2V_STEPS)]
    assert scheduler.sigmas[:-1].double().tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([1.0, 0.9375, 5 / 6, 0.625])


def test_each_step_is_lightx2vs_euler_update():
    """diffusers' FlowMatchEulerDiscreteScheduler steps as WanStepDistillScheduler.step_post does:
    x - sigma * v + sigma_next * v (sigma_next 0 at the last step)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 2, 3, 3, generator=generator)
    flows = [torch.randn(1, 4, 2, 3, 3, generator=generator) for _ in LIGHTX2V_STEPS]
    seen = []

    def velocity(latents, step):
        seen.append(float(step.timestep))
        return flows[step.index]

    result = denoise(noise, make_scheduler(DISTILL), velocity)
    timesteps, sigmas = lightx2v_schedule(LIGHTX2V_STEPS, 5.0)
    expected = noise.clone()
    for index, flow in enumerate(flows):
        sigma_next = sigmas[index + 1].item() if index + 1 < len(flows) else 0.0
        expected = expected - sigmas[index].item() * flow + flow * sigma_next
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
    assert seen == pytest.approx(timesteps.tolist(), abs=1e-3)  # the DiT sees 1000 * sigma


def count_predictions(velocity_for, settings: SamplerSettings) -> list[tuple[int, str]]:
    calls = []

    def predict(latents, step: Step):
        calls.append((step.index, step.side))
        return torch.zeros_like(latents)

    denoise(torch.zeros(1, 2), make_scheduler(settings), velocity_for(predict, settings.guidance_scale))
    return calls


def test_without_guidance_each_step_runs_one_forward_with_guidance_two():
    one_process = SingleProcess().guided_velocity  # what the engine calls with one process
    assert count_predictions(one_process, DISTILL) == [(index, "positive") for index in range(4)]
    with_cfg = SamplerSettings(scheduler="step_distill", timesteps=LIGHTX2V_STEPS, guidance_scale=5.0)
    assert count_predictions(one_process, with_cfg) == [(i, side) for i in range(4) for side in ("positive", "negative")]
    assert len(count_predictions(guided_velocity, SamplerSettings(num_steps=3))) == 6  # UniPC, CFG 5: as before
    assert DISTILL.cfg_passes == 1 and with_cfg.cfg_passes == 2


def test_cfg_parallel_without_guidance_is_refused():
    with pytest.raises(BindWeaveInputError, match=r"parallel.cfg=2 .* sampler.guidance_scale=1 .*\(parallel=ulysses2"):
        refuse_cfg_parallel_without_guidance(DISTILL.guidance_scale, 2)
    refuse_cfg_parallel_without_guidance(5.0, 2)
    refuse_cfg_parallel_without_guidance(1.0, 1)
    with pytest.raises(BindWeaveInputError, match="parallel.cfg=2"):  # the runtime's own call, before any exchange
        parallel_guided_velocity(lambda latents, step: latents, 1.0, cfg_degree=2, cfg_rank=0, cfg_group=None)


@pytest.mark.parametrize("fields, message", [
    ({"scheduler": "euler"}, "sampler.scheduler=euler is not one of unipc, step_distill"),
    ({"timesteps": [1000, 500]}, "sampler.timesteps=[1000, 500] is for sampler.scheduler=step_distill"),
    ({"scheduler": "step_distill"}, "needs sampler.timesteps"),
    ({"scheduler": "step_distill", "timesteps": [1000, 500, 500]}, "strictly decreasing"),
    ({"scheduler": "step_distill", "timesteps": [1001, 500]}, "whole numbers in (0, 1000]"),
    ({"scheduler": "step_distill", "timesteps": [1000, 0]}, "whole numbers in (0, 1000]"),
    ({"scheduler": "step_distill", "timesteps": [1000, 437.5]}, "whole numbers"),
])
def test_bad_schedules_are_refused_naming_the_field(fields, message):
    with pytest.raises(BindWeaveInputError, match=re.escape(message)):
        SamplerSettings(**fields)


def test_the_recipe_records_the_schedule_and_keeps_unipc_runs_unchanged():
    # The recipe of runs made before the scheduler existed: exactly these keys.
    assert SamplerSettings().recipe() == {"num_steps": 50, "guidance_scale": 5.0, "flow_shift": 3.0,
                                          "num_train_timesteps": 1000}
    assert DISTILL.recipe() == {"num_steps": 4, "guidance_scale": 1.0, "flow_shift": 5.0, "num_train_timesteps": 1000,
                                "scheduler": "step_distill", "timesteps": LIGHTX2V_STEPS}
    inputs, models = {"images": [], "hidden_states": []}, {}
    other = SamplerSettings(scheduler="step_distill", timesteps=[1000, 800, 500, 200], flow_shift=5.0,
                            guidance_scale=1.0)
    recorded, now = (sample_recipe("p", inputs, 1, VideoSettings(), sampler, models, {}) for sampler in (DISTILL, other))
    assert changes(recorded, now) == ["sampler.timesteps: [1000, 750, 500, 250] -> [1000, 800, 500, 200]"]


def test_the_timesteps_set_the_step_count():
    """The list is the schedule: model=tiny's num_steps=8 (composed after the sampler group) gives way."""
    job = settings_of(compose_config("generate", ["sampler=step_distill_4step"]))
    assert job.sampler == DISTILL and job.sampler.timesteps == tuple(LIGHTX2V_STEPS) and job.sampler.num_steps == 4
    two = settings_of(compose_config("generate", ["sampler=step_distill_4step", "sampler.timesteps=[1000,500]"]))
    assert two.sampler.num_steps == 2 and len(make_scheduler(two.sampler).timesteps) == 2
    assert SamplerSettings(num_steps=8).num_steps == 8  # UniPC keeps its own


def test_a_job_with_the_distill_schedule_runs_one_forward_per_step(tiny_models, tmp_path):
    models = build_models(ModelSettings(tiny_root=str(tiny_models.bindweave.parent), dtype="float32",
                                              device="cpu", cache_dir=str(tmp_path / "cache")))
    meta = demo_meta_with_hidden_states(tmp_path / "demo", hidden_dim=models.hidden_dim, qwen_folder=tiny_models.qwen)
    sample = read_meta(meta)[0]
    timesteps = []
    hook = models.transformer.register_forward_pre_hook(lambda module, args: timesteps.append(float(args[1])))
    try:
        record = generate_sample(models, Stage3Job(sample, VideoSettings(height=48, width=64, num_frames=5), DISTILL,
                                                   None), progress=False)
    finally:
        hook.remove()
    assert timesteps == pytest.approx(lightx2v_schedule(LIGHTX2V_STEPS, 5.0)[0].tolist(), abs=1e-3)
    assert record["recipe"]["sampler"]["timesteps"] == LIGHTX2V_STEPS and record["frames"] is not None
