"""CFG parallel: the positive and negative passes on two sequence groups at once.

cfg-rank 0 runs the positive (conditional) pass, cfg-rank 1 the negative one; each step the two
predictions are all-gathered across the cfg group and both ranks combine them with the one CFG
formula, :func:`bindweave.sampling.sampler.combine_guidance`, so both groups take bit-identical scheduler
steps and their latents never drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bindweave.sampling.sampler import SIDES, PredictFn, Step, VelocityFn, combine_guidance, guided_velocity
from bindweave.settings.sampling import refuse_cfg_parallel_without_guidance


def parallel_guided_velocity(predict: PredictFn, guidance_scale: float, cfg_degree: int, cfg_rank: int,
                             cfg_group: dist.ProcessGroup | None) -> VelocityFn:
    """Guided velocity with this rank's CFG side (cfg-rank r computes ``SIDES[r]``, exchanged over
    ``cfg_group``); sequential when ``cfg_degree == 1``. ``parallel.runtime.Runtime`` calls it."""
    if cfg_degree == 1:
        return guided_velocity(predict, guidance_scale)
    refuse_cfg_parallel_without_guidance(guidance_scale, cfg_degree)  # the plan refuses it first; a direct caller here
    side = SIDES[cfg_rank]

    def velocity(latents: torch.Tensor, step: Step) -> torch.Tensor:
        own = predict(latents, step.for_side(side)).contiguous()
        predictions = [torch.empty_like(own) for _ in SIDES]
        dist.all_gather(predictions, own, group=cfg_group)
        cond, uncond = predictions
        return combine_guidance(cond, uncond, guidance_scale)

    return velocity


def cfg_exchange_bytes_per_rank(prediction_elements: int, element_size: int, cfg_degree: int) -> int:
    """Bytes one rank sends per sampling step in the exchange above: its own prediction, to the
    other CFG rank (none with ``cfg_degree == 1``)."""
    return (cfg_degree - 1) * prediction_elements * element_size
