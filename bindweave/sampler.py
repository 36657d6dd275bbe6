"""UniPC flow sampling with classifier-free guidance, as the reference runs it (SPEC §6).

The schedule is diffusers 0.33.1's (the version the reference pins). Newer diffusers compute a
different flow-sigma grid from the same config; passing the unshifted grid as ``sigmas``
reproduces 0.33.1's sigmas, timesteps and updates exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

# A velocity function maps (latents, timestep) -> guided flow velocity of the same shape.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A prediction function runs the DiT for one prompt side ("positive" or "negative").
PredictFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class SamplerSettings:
    num_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 3.0
    num_train_timesteps: int = 1000
    seed: int = 1234  # a sample's own "seed" field in the meta JSON wins

    def __post_init__(self):
        from bindweave.errors import BindWeaveInputError

        problems = [f"sampler.{name}={getattr(self, name)} must be > 0" for name in
                    ("num_steps", "flow_shift", "num_train_timesteps") if getattr(self, name) <= 0]
        if self.guidance_scale < 0:
            problems.append(f"sampler.guidance_scale={self.guidance_scale} must be >= 0 (1: no guidance)")
        if problems:
            raise BindWeaveInputError("; ".join(problems))


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


def make_scheduler(settings: SamplerSettings) -> UniPCMultistepScheduler:
    """SPEC §6's UniPC config with the reference's (diffusers 0.33.1) sigma grid set."""
    scheduler = UniPCMultistepScheduler(**unipc_config(settings))
    steps = settings.num_steps
    unshifted = (1 - np.linspace(1, 1 / settings.num_train_timesteps, steps + 1))[::-1][:-1].copy()
    scheduler.set_timesteps(sigmas=unshifted)
    return scheduler


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """CPU generator, bf16 ``randn`` (SPEC §6): the same seed gives the same noise on every rank and device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16)


def guided_velocity(predict: PredictFn, guidance_scale: float) -> VelocityFn:
    """Sequential CFG: ``uncond + g * (cond - uncond)``; cond uses the positive T5/Qwen inputs."""

    def velocity(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        cond = predict(latents, timestep, "positive")
        uncond = predict(latents, timestep, "negative")
        return uncond + guidance_scale * (cond - uncond)

    return velocity


def denoise(
    noise: torch.Tensor,
    scheduler: UniPCMultistepScheduler,
    velocity: VelocityFn,
    progress: Callable[[Iterable], Iterable] = iter,
) -> torch.Tensor:
    """Run every scheduler step; the latents stay fp32 between steps, the model sees its own dtype."""
    latents = noise.float()
    for timestep in progress(scheduler.timesteps):
        flow = velocity(latents, timestep.reshape(1))
        latents = scheduler.step(flow.float(), timestep, latents, return_dict=False)[0]
    return latents
