"""Sampling settings: the UniPC sampler and CFG (``sampler.*``, bindweave/sampling/sampler.py) and
step caching (``cache.*``, bindweave/sampling/step_cache.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bindweave.errors import BindWeaveInputError

CACHE_KINDS = ("none", "magcache", "teacache")
DEFAULT_THRESHOLDS = {"magcache": 0.12, "teacache": 0.2}  # the papers' defaults for Wan2.1 720P


@dataclass(frozen=True)
class SamplerSettings:
    num_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 3.0
    num_train_timesteps: int = 1000
    seed: int = 1234  # a sample's own "seed" field in the meta JSON wins

    def __post_init__(self):
        problems = [f"sampler.{name}={getattr(self, name)} must be > 0" for name in
                    ("num_steps", "flow_shift", "num_train_timesteps") if getattr(self, name) <= 0]
        if self.guidance_scale < 0:
            problems.append(f"sampler.guidance_scale={self.guidance_scale} must be >= 0 (1: no guidance)")
        if problems:
            raise BindWeaveInputError("; ".join(problems))


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
