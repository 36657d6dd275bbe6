"""Sampling settings: the sampler and CFG (``sampler.*``, bindweave/sampling/sampler.py) and step
caching (``cache.*``, bindweave/sampling/step_cache.py).

``sampler.scheduler``:

- ``unipc`` (the default, SPEC §6): UniPC on the reference's grid of ``num_steps`` steps;
  ``sampler.timesteps`` stays empty.
- ``step_distill``: the schedule LightX2V's step-distilled Wan2.1 checkpoints were trained for
  (``WanStepDistillScheduler``; its configs ``configs/distill/wan_i2v_distill_4step_cfg.json``:
  ``denoising_step_list`` [1000, 750, 500, 250], ``sample_shift`` 5, ``enable_cfg`` false):
  ``sampler.timesteps`` lists the steps on the 1000-step training grid, each is shifted by
  ``sampler.flow_shift`` and the latents take one Euler flow step per entry, the last to sigma 0.
  The list is the schedule: it sets ``sampler.num_steps`` to its length, replacing any step count
  given beside it (a model preset's, e.g. ``model=tiny``'s 8), so the two never disagree.

``sampler.guidance_scale=1`` is no guidance: one DiT forward per step, the negative pass skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bindweave.errors import BindWeaveInputError

SCHEDULERS = ("unipc", "step_distill")
CACHE_KINDS = ("none", "magcache", "teacache")
DEFAULT_THRESHOLDS = {"magcache": 0.12, "teacache": 0.2}  # the papers' defaults for Wan2.1 720P
NO_GUIDANCE = 1.0  # uncond + 1 * (cond - uncond) is cond: the negative pass adds nothing


@dataclass(frozen=True)
class SamplerSettings:
    num_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 3.0
    num_train_timesteps: int = 1000
    seed: int = 1234  # a sample's own "seed" field in the meta JSON wins
    scheduler: str = "unipc"  # unipc | step_distill (module docstring)
    timesteps: tuple[int, ...] = ()  # step_distill: the steps on the training grid, e.g. [1000, 750, 500, 250];
    # they set num_steps to their count

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(self.timesteps))
        if self.scheduler == "step_distill" and self.timesteps:
            object.__setattr__(self, "num_steps", len(self.timesteps))  # the list is the schedule
        problems = [f"sampler.{name}={getattr(self, name)} must be > 0" for name in
                    ("num_steps", "flow_shift", "num_train_timesteps") if getattr(self, name) <= 0]
        if self.guidance_scale < 0:
            problems.append(f"sampler.guidance_scale={self.guidance_scale} must be >= 0 (1: no guidance)")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"sampler.scheduler={self.scheduler} is not one of {', '.join(SCHEDULERS)}")
        elif self.scheduler == "unipc" and self.timesteps:
            problems.append(f"sampler.timesteps={list(self.timesteps)} is for sampler.scheduler=step_distill: UniPC "
                            "takes its grid from sampler.num_steps (set sampler.timesteps=[] or the scheduler)")
        elif self.scheduler == "step_distill":
            problems += self._timestep_problems()
        if problems:
            raise BindWeaveInputError("; ".join(problems))

    def _timestep_problems(self) -> list[str]:
        listed, top = list(self.timesteps), self.num_train_timesteps
        if not listed:
            return ["sampler.scheduler=step_distill needs sampler.timesteps, the checkpoint's steps on the training "
                    "grid (LightX2V's 4-step Wan2.1 distill: sampler=step_distill_4step, i.e. "
                    "sampler.timesteps=[1000,750,500,250] sampler.flow_shift=5 sampler.guidance_scale=1)"]
        problems = []
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 < t <= top for t in listed):
            problems.append(f"sampler.timesteps={listed} must be whole numbers in (0, {top}] "
                            "(steps on the training grid, like LightX2V's denoising_step_list)")
        elif any(later >= earlier for earlier, later in zip(listed, listed[1:])):
            problems.append(f"sampler.timesteps={listed} must be strictly decreasing (from noise to clean)")
        return problems

    @property
    def cfg_passes(self) -> int:
        """DiT forwards per step: 1 without guidance (``guidance_scale`` 1), else 2 (positive, negative)."""
        return 1 if self.guidance_scale == NO_GUIDANCE else 2

    def recipe(self) -> dict:
        """What changes the pixels (resume compares it; the seed is recorded per sample). The
        scheduler and its timesteps only when not UniPC, so a run made before they existed keeps
        its recipe."""
        recipe = {key: value for key, value in asdict(self).items() if key != "seed"}
        if self.scheduler == "unipc":
            del recipe["scheduler"], recipe["timesteps"]
        else:
            recipe["timesteps"] = list(self.timesteps)  # as the sidecar's JSON reads back
        return recipe


def refuse_cfg_parallel_without_guidance(guidance_scale: float, cfg_degree: int) -> None:
    """CFG parallel (``parallel.cfg=2``) puts the negative pass on its own process group; without
    guidance (``sampler.guidance_scale=1``) there is no negative pass to run there. Call it with
    the layout's CFG degree before any weight loads (an automatic layout should choose ``cfg=1``
    instead); ``parallel.cfg.parallel_guided_velocity`` calls it too."""
    if cfg_degree > 1 and guidance_scale == NO_GUIDANCE:
        raise BindWeaveInputError(
            f"parallel.cfg={cfg_degree} runs the positive and negative CFG passes on separate GPU groups, but "
            f"sampler.guidance_scale={guidance_scale:g} (no guidance) runs only the positive pass: use a layout "
            "without cfg (parallel=ulysses2, ulysses4, data2, ...) or sampler.guidance_scale > 1")


@dataclass(frozen=True)
class CacheSettings:
    """``cache.*``: which criterion, and its limits (module docstring). ``threshold`` None: the
    kind's published default; ``first_exact_steps`` None: a fifth of the steps; ``calibration``:
    a file from ``launch/calibrate.py`` (None: the published Wan2.1-I2V-14B-720P values)."""

    kind: str = "none"
    threshold: float | None = None
    max_consecutive_skips: int = 2
    first_exact_steps: int | None = None
    last_exact_steps: int = 0
    calibration: str | None = None

    def __post_init__(self):
        problems = []
        if self.kind not in CACHE_KINDS:
            problems.append(f"cache.kind={self.kind} is not one of {', '.join(CACHE_KINDS)}")
        if self.threshold is not None and self.threshold < 0:
            problems.append(f"cache.threshold={self.threshold} must be >= 0 (0: never skip)")
        for name in ("max_consecutive_skips", "last_exact_steps"):
            if getattr(self, name) < 0:
                problems.append(f"cache.{name}={getattr(self, name)} must be >= 0")
        if self.first_exact_steps is not None and self.first_exact_steps < 1:
            problems.append(f"cache.first_exact_steps={self.first_exact_steps} must be >= 1 (step 0 has no residual "
                            "to reuse)")
        if problems:
            raise BindWeaveInputError("; ".join(problems))

    @property
    def resolved_threshold(self) -> float:
        return DEFAULT_THRESHOLDS.get(self.kind, 0.0) if self.threshold is None else self.threshold

    def exact_window(self, num_steps: int) -> tuple[int, int]:
        """Steps ``[first, last)`` may be skipped."""
        first = int(0.2 * num_steps + 0.5) if self.first_exact_steps is None else self.first_exact_steps
        return max(first, 1), num_steps - self.last_exact_steps

    def recipe(self) -> dict:
        """What changes the pixels (resume compares it): nothing when off."""
        return {"kind": "none"} if self.kind == "none" else asdict(self)
