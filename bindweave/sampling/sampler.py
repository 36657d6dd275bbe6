"""Flow sampling with classifier-free guidance: UniPC as the reference runs it (SPEC §6), or the
step-distill schedule of LightX2V's few-step Wan2.1 checkpoints.

UniPC: the schedule is diffusers 0.33.1's (the version the reference pins). Newer diffusers compute
a different flow-sigma grid from the same config; passing the unshifted grid as ``sigmas``
reproduces 0.33.1's sigmas, timesteps and updates exactly.

Step distill (``sampler.scheduler=step_distill``): LightX2V's ``WanStepDistillScheduler`` takes
each listed timestep t as sigma u = t / 1000 on its 1000-step training grid, shifts it
(``shift * u / (1 + (shift - 1) * u)``), feeds the DiT ``1000 * sigma`` and steps the latents
``x - sigma * v + sigma_next * v`` (sigma_next 0 after the last). That is diffusers'
``FlowMatchEulerDiscreteScheduler`` with ``shift`` and those unshifted ``sigmas``
(``x + (sigma_next - sigma) * v``, the same step): tests/test_sampler.py checks both against the
formula.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from bindweave.settings.sampling import NO_GUIDANCE, SamplerSettings

SIDES = ("positive", "negative")  # the two CFG passes: the prompt's text inputs, the negative prompt's


@dataclass(frozen=True)
class Step:
    """Where the sampler is: the step index (0-based) of ``num_steps``, its timestep, and which
    CFG side a prediction is for (None until a side is chosen). Predictors get it whole, so a step
    cache or a progress report has what it needs."""

    index: int
    num_steps: int
    timestep: torch.Tensor
    side: str | None = None

    def for_side(self, side: str) -> "Step":
        return replace(self, side=side)


# A velocity function maps (latents, step) -> guided flow velocity of the same shape.
VelocityFn = Callable[[torch.Tensor, Step], torch.Tensor]
# A prediction function runs the DiT for one CFG side (``step.side``).
PredictFn = Callable[[torch.Tensor, Step], torch.Tensor]


def unipc_config(settings: SamplerSettings) -> dict:
    """SPEC §6's UniPC configuration (the scheduler_config.json of the Wan repos, with our shift)."""
    return dict(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=settings.flow_shift,
        num_train_timesteps=settings.num_train_timesteps,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )


def make_scheduler(settings: SamplerSettings) -> SchedulerMixin:
    """The scheduler of ``sampler.scheduler`` with its steps set."""
    if settings.scheduler == "step_distill":
        return make_step_distill_scheduler(settings)
    return make_unipc_scheduler(settings)


def make_unipc_scheduler(settings: SamplerSettings) -> UniPCMultistepScheduler:
    """SPEC §6's UniPC config with the reference's (diffusers 0.33.1) sigma grid set."""
    scheduler = UniPCMultistepScheduler(**unipc_config(settings))
    steps = settings.num_steps
    unshifted = (1 - np.linspace(1, 1 / settings.num_train_timesteps, steps + 1))[::-1][:-1].copy()
    scheduler.set_timesteps(sigmas=unshifted)
    return scheduler


def make_step_distill_scheduler(settings: SamplerSettings) -> FlowMatchEulerDiscreteScheduler:
    """Euler flow steps at ``settings.timesteps`` shifted by ``flow_shift`` (module docstring)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=settings.num_train_timesteps,
                                                shift=settings.flow_shift)
    scheduler.set_timesteps(sigmas=[t / settings.num_train_timesteps for t in settings.timesteps])
    return scheduler


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """CPU generator, bf16 ``randn`` (SPEC §6): the same seed gives the same noise on every rank and device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The one CFG formula (SPEC §6): ``uncond + g * (cond - uncond)``. Sequential and CFG-parallel
    runs both use it, so they take bit-identical steps."""
    return uncond + guidance_scale * (cond - uncond)


def guided_velocity(predict: PredictFn, guidance_scale: float) -> VelocityFn:
    """Sequential CFG: the positive pass, then the negative one, combined; without guidance
    (``guidance_scale`` 1) the positive pass alone, one forward per step."""
    if guidance_scale == NO_GUIDANCE:
        return lambda latents, step: predict(latents, step.for_side(SIDES[0]))

    def velocity(latents: torch.Tensor, step: Step) -> torch.Tensor:
        cond, uncond = (predict(latents, step.for_side(side)) for side in SIDES)
        return combine_guidance(cond, uncond, guidance_scale)

    return velocity


def denoise(
    noise: torch.Tensor,
    scheduler: SchedulerMixin,
    velocity: VelocityFn,
    progress: Callable[[Iterable], Iterable] = iter,
) -> torch.Tensor:
    """Run every scheduler step; the latents stay fp32 between steps, the model sees its own dtype.
    ``progress`` wraps the timesteps (a bar, per-step logging, a cancel check between steps)."""
    latents = noise.float()
    num_steps = len(scheduler.timesteps)
    for index, timestep in enumerate(progress(scheduler.timesteps)):
        flow = velocity(latents, Step(index, num_steps, timestep.reshape(1)))
        latents = scheduler.step(flow.float(), timestep, latents, return_dict=False)[0]
    return latents
