"""CFG parallel: the positive and negative passes on two sequence groups at once.

cfg-rank 0 runs the positive (conditional) pass, cfg-rank 1 the negative one; each step the two
predictions are all-gathered across the cfg group and both ranks combine them with the same
expression as :func:`bindweave.sampler.guided_velocity`, so both groups take bit-identical
scheduler steps and their latents never drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bindweave.sampler import PredictFn, VelocityFn, guided_velocity
from parallel.runtime import Runtime

SIDE_OF_CFG_RANK = ("positive", "negative")


def parallel_guided_velocity(predict: PredictFn, guidance_scale: float, runtime: Runtime) -> VelocityFn:
    """``uncond + g * (cond - uncond)``; sequential when ``runtime.layout.cfg == 1``."""
    if runtime.layout.cfg == 1:
        return guided_velocity(predict, guidance_scale)
    side = SIDE_OF_CFG_RANK[runtime.cfg_rank]

    def velocity(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        own = predict(latents, timestep, side).contiguous()
        predictions = [torch.empty_like(own) for _ in SIDE_OF_CFG_RANK]
        dist.all_gather(predictions, own, group=runtime.cfg_group)
        cond, uncond = predictions
        return uncond + guidance_scale * (cond - uncond)

    return velocity
