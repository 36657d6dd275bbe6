"""Step caching: at some denoising steps the DiT's 40 blocks are not run; their output is taken
as the blocks' input plus the residual they added at the last step they ran (for the same CFG side).

Two criteria decide when, both from the model's calibration (bindweave.sampling.calibration):

- ``magcache`` (MagCache): multiply the calibrated magnitude ratios of the steps skipped so far;
  skip while the summed error ``sum |1 - product|`` stays below ``threshold``.
- ``teacache`` (TeaCache): accumulate the rescaled relative L1 change of the timestep projection
  since the last computed step; skip while it stays below ``threshold``.

Both never skip the first ``first_exact_steps`` (default: a fifth of the steps, MagCache's
retention ratio) or the last ``last_exact_steps``, nor more than ``max_consecutive_skips`` in a
row. ``threshold=0`` never skips (both tests are strict), which reproduces the exact run.

CFG: each side keeps its own residual and its own accumulators. The two passes see different text
contexts, so their residuals differ (one side's cannot stand in for the other's), and MagCache's
ratios are calibrated per side. The decision never depends on a rank's share of the tokens, only
on the step, the calibration and the timestep, so the ranks of a sequence-parallel group always
skip together (one rank skipping alone would leave the others waiting in the all-to-all). Under
TeaCache both sides see the same timestep, so they skip the same steps.

Why not diffusers' ``MagCacheConfig`` hooks: they run under ``torch.compiler.disable`` around
each block, which takes the regionally compiled blocks back to eager, count steps by calls rather
than being told the step, and diffusers has no TeaCache. The decision logic is the papers'; the
seam is one argument of the BindWeave forward (``block_cache``).

    cache = StepCache(CacheSettings(kind="magcache"), num_steps=50)
    velocity = transformer(..., block_cache=cache.for_step(step))   # per CFG side
    cache.record()   # what was skipped, for the sidecar
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from bindweave.sampling.calibration import Calibration, fit_teacache, load_calibration
from bindweave.sampling.sampler import SIDES, Step
from bindweave.settings.sampling import CacheSettings

log = logging.getLogger("bindweave")

# A forward's blocks as one call: tokens -> tokens.
RunBlocks = Callable[[torch.Tensor], torch.Tensor]
# What the DiT calls instead of its blocks: (run_blocks, tokens, timestep_projection) -> tokens.
BlockCache = Callable[[RunBlocks, torch.Tensor, torch.Tensor], torch.Tensor]


class _SideState:
    """One CFG side's cache: its last residual and the criterion's accumulators."""

    def __init__(self):
        self.residual: torch.Tensor | None = None
        self.previous_embedding: torch.Tensor | None = None
        self.ratio = 1.0
        self.error = 0.0
        self.skips_in_row = 0
        self.skipped: list[int] = []
        self.computed: list[int] = []

    def reset_accumulators(self):
        self.ratio, self.error, self.skips_in_row = 1.0, 0.0, 0


class StepCache:
    """The cache of one job (a new job starts a new cache: no state outlives it)."""

    def __init__(self, settings: CacheSettings, num_steps: int, calibration: Calibration | None = None):
        if settings.kind == "none":
            raise ValueError("StepCache needs cache.kind magcache or teacache")
        self.settings = settings
        self.num_steps = num_steps
        self.calibration = calibration or load_calibration(settings.calibration)
        self.threshold = settings.resolved_threshold
        self.window = settings.exact_window(num_steps)
        self.ratios = {side: self.calibration.ratios_for(side, num_steps) for side in SIDES}
        self.sides = {side: _SideState() for side in SIDES}

    def for_step(self, step: Step) -> BlockCache:
        """The blocks' stand-in for this step and CFG side."""
        state = self.sides[step.side]

        def run(run_blocks: RunBlocks, tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
            if self._skip(state, step, embedding):
                state.skipped.append(step.index)
                return tokens + state.residual
            out = run_blocks(tokens)
            state.residual = out - tokens
            state.computed.append(step.index)
            return out

        return run

    def _skip(self, state: _SideState, step: Step, embedding: torch.Tensor) -> bool:
        distance = None
        if self.settings.kind == "teacache":
            embedding = embedding.float()
            if state.previous_embedding is not None:
                distance = ((embedding - state.previous_embedding).abs().mean()
                            / state.previous_embedding.abs().mean()).item()
            state.previous_embedding = embedding
        first, last = self.window
        if state.residual is None or not first <= step.index < last:
            state.reset_accumulators()
            return False
        if self.settings.kind == "magcache":
            state.ratio *= float(self.ratios[step.side][step.index])
            state.error += abs(1.0 - state.ratio)
        else:
            state.error += float(np.polyval(self.calibration.teacache_coefficients, distance))
        if state.error < self.threshold and state.skips_in_row < self.settings.max_consecutive_skips:
            state.skips_in_row += 1
            return True
        state.reset_accumulators()
        return False

    def record(self) -> dict:
        """For the sidecar and the log: what ran and what was skipped, per side seen by this process."""
        seen = {side: state for side, state in self.sides.items() if state.computed or state.skipped}
        return {
            "kind": self.settings.kind, "threshold": self.threshold,
            "max_consecutive_skips": self.settings.max_consecutive_skips,
            "exact_steps": {"first": self.window[0], "last": self.num_steps - self.window[1]},
            "calibration": self.calibration.describe(),
            "skipped_steps": {side: state.skipped for side, state in seen.items()},
            "forwards_run": sum(len(state.computed) for state in seen.values()),
            "forwards_skipped": sum(len(state.skipped) for state in seen.values()),
        }


class StepStatistics:
    """Calibration: runs every step (the exact job) and measures what :mod:`calibration` lists."""

    def __init__(self):
        self.previous = {side: None for side in SIDES}
        self.mag_ratios = {side: [] for side in SIDES}
        self.residual_distance = {side: [] for side in SIDES}
        self.embedding_distance = {side: [] for side in SIDES}

    def for_step(self, step: Step) -> BlockCache:
        def run(run_blocks: RunBlocks, tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
            out = run_blocks(tokens)
            residual, embedding = (out - tokens).float(), embedding.float()
            previous = self.previous[step.side]
            if previous is None or step.index == 0:
                self.mag_ratios[step.side].append(1.0)
            else:
                old_residual, old_embedding = previous
                self.mag_ratios[step.side].append(
                    (residual.norm(dim=-1) / old_residual.norm(dim=-1).clamp_min(1e-8)).mean().item())
                self.residual_distance[step.side].append(relative_l1(residual, old_residual))
                self.embedding_distance[step.side].append(relative_l1(embedding, old_embedding))
            self.previous[step.side] = (residual, embedding)
            return out

        return run


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    return ((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12)).item()


def build_step_cache(settings: CacheSettings, num_steps: int) -> StepCache | None:
    return None if settings.kind == "none" else StepCache(settings, num_steps)


def calibration_from(statistics: StepStatistics, source: str, details: dict) -> Calibration:
    """The mean over the calibrated jobs of each side's per-step statistics, and TeaCache's fit."""
    def per_step_mean(values: list[float], per_job: int) -> list[float]:
        return np.asarray(values, dtype=np.float64).reshape(-1, per_job).mean(axis=0).round(6).tolist()

    num_steps = details["num_steps"]
    ratios = {side: per_step_mean(statistics.mag_ratios[side], num_steps) for side in SIDES}
    embedding = per_step_mean(statistics.embedding_distance["positive"], num_steps - 1)
    residual = {side: per_step_mean(statistics.residual_distance[side], num_steps - 1) for side in SIDES}
    both_sides = ((np.asarray(residual["positive"]) + np.asarray(residual["negative"])) / 2).tolist()
    return Calibration(source=source, bindweave_calibrated=True, mag_ratios={s: tuple(r) for s, r in ratios.items()},
                       teacache_coefficients=fit_teacache(embedding, both_sides),
                       details={**details, "teacache_distances": {"embedding": embedding, "residual": residual}})
