"""The per-step statistics a step cache decides with, and the small JSON file that holds them.

``python launch/calibrate.py`` runs exact jobs on the user's weights and writes this file
(:func:`write_calibration`); ``cache.calibration=PATH`` reads it. Without a file the published
values for Wan2.1-I2V-14B-720P are used (:data:`PUBLISHED_WAN21_I2V_720P`), and every log and
sidecar says they are not BindWeave-calibrated: BindWeave is that model fine-tuned with extra
context tokens, so its curves are close to, not equal to, these.

Statistics per CFG side and step ``i`` (the blocks' residual ``r_i`` = their output minus their
input; ``e_i`` the timestep projection the blocks are modulated with):

- MagCache ratio: mean over tokens of ``|r_i| / |r_{i-1}|`` (1.0 at step 0);
- TeaCache distances: ``mean|e_i - e_{i-1}| / mean|e_{i-1}|`` (the input side) and the same of
  ``r`` (the output side); a degree-4 polynomial fitted from the first to the second is what
  TeaCache accumulates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bindweave.errors import BindWeaveInputError
from bindweave.sampling.sampler import SIDES

CALIBRATION_FORMAT = "bindweave-step-cache-calibration/1"

CALIBRATE_HINT = ("make one with python launch/calibrate.py (an exact job on your weights), or leave "
                  "cache.calibration unset for the published Wan2.1-I2V-14B-720P values")


@dataclass(frozen=True)
class Calibration:
    """``mag_ratios``: per side, one ratio per step of a ``len``-step run (resampled to other step
    counts by :meth:`ratios_for`); ``teacache_coefficients``: highest power first (numpy.polyval)."""

    source: str
    bindweave_calibrated: bool
    mag_ratios: dict[str, tuple[float, ...]]
    teacache_coefficients: tuple[float, ...]
    details: dict = field(default_factory=dict, compare=False)  # what calibrate measured, kept in the file

    def ratios_for(self, side: str, num_steps: int) -> np.ndarray:
        """Nearest-neighbour resampling to ``num_steps`` (MagCache's own rule for other step counts)."""
        ratios = np.asarray(self.mag_ratios[side], dtype=np.float64)
        if num_steps == 1:
            return ratios[-1:]
        picks = np.round(np.arange(num_steps) * (len(ratios) - 1) / (num_steps - 1)).astype(int)
        return ratios[picks]

    def describe(self) -> str:
        kind = "BindWeave-calibrated" if self.bindweave_calibrated else "NOT BindWeave-calibrated"
        return f"{self.source} ({kind})"


# MagCache's released ratios for Wan2.1-I2V-14B-720P (Zehong-Ma/MagCache, MagCache4Wan2.1, 40 steps,
# cond/uncond de-interleaved) and TeaCache's released coefficients for the same model with its
# timestep-projection input (ali-vilab/TeaCache, TeaCache4Wan2.1, "use_ret_steps").
PUBLISHED_WAN21_I2V_720P = Calibration(
    source="published Wan2.1-I2V-14B-720P values (MagCache, TeaCache)",
    bindweave_calibrated=False,
    mag_ratios={
        "positive": (1.0, 0.99428, 0.98588, 0.98273, 0.99018, 0.98911, 0.98646, 0.99454, 0.9891, 0.99124, 0.99102,
                     0.99215, 0.99515, 0.99576, 0.99068, 0.99097, 0.99166, 0.99041, 0.99201, 0.99101, 0.98599,
                     0.98845, 0.98848, 0.98862, 0.98718, 0.98497, 0.98264, 0.98389, 0.97938, 0.97535, 0.97498,
                     0.973, 0.96827, 0.96261, 0.95335, 0.94649, 0.93397, 0.91636, 0.89088, 0.8679),
        "negative": (1.0, 0.99498, 0.98621, 0.98281, 0.99023, 0.98917, 0.98652, 0.99456, 0.98909, 0.99127, 0.99103,
                     0.99212, 0.99515, 0.99572, 0.99072, 0.99097, 0.99169, 0.99042, 0.99198, 0.99101, 0.98603,
                     0.98844, 0.98851, 0.98857, 0.98719, 0.98497, 0.98263, 0.98393, 0.9794, 0.97536, 0.97499,
                     0.97301, 0.96828, 0.96263, 0.9534, 0.94655, 0.93414, 0.9165, 0.89109, 0.86768),
    },
    teacache_coefficients=(8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-01),
)


def fit_teacache(input_distances: list[float], output_distances: list[float]) -> tuple[float, ...]:
    """TeaCache's rescaling: a degree-4 polynomial from input to output distance (fewer points:
    a lower degree, padded with zeros so the file always holds 5 coefficients)."""
    degree = min(4, len(input_distances) - 1)
    if degree < 1:
        raise BindWeaveInputError("calibration needs at least 3 steps (two step-to-step distances)")
    fitted = np.polyfit(np.asarray(input_distances), np.asarray(output_distances), degree)
    return tuple(float(c) for c in np.concatenate([np.zeros(4 - degree), fitted]))


def calibration_record(calibration: Calibration) -> dict:
    return {"format": CALIBRATION_FORMAT, "source": calibration.source,
            "bindweave_calibrated": calibration.bindweave_calibrated,
            "magcache": {"ratios": {side: list(calibration.mag_ratios[side]) for side in SIDES}},
            "teacache": {"coefficients": list(calibration.teacache_coefficients)},
            **calibration.details}


def read_calibration(path: Path) -> Calibration:
    """A calibration file, checked whole: one error naming the file, the field and the fix."""
    if not path.is_file():
        raise BindWeaveInputError(f"cache.calibration={path}: no such file; {CALIBRATE_HINT}")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BindWeaveInputError(f"cache.calibration={path}: not readable JSON ({error}); {CALIBRATE_HINT}") from error

    def problem(what: str) -> BindWeaveInputError:
        return BindWeaveInputError(f"cache.calibration={path}: {what}; {CALIBRATE_HINT}")

    if not isinstance(record, dict) or record.get("format") != CALIBRATION_FORMAT:
        raise problem(f"'format' is not {CALIBRATION_FORMAT!r} (not a file written by launch/calibrate.py)")
    try:
        ratios = {side: record["magcache"]["ratios"][side] for side in SIDES}
        coefficients = record["teacache"]["coefficients"]
    except (KeyError, TypeError) as error:
        raise problem(f"missing field {error} (expected magcache.ratios.positive/negative, teacache.coefficients)")
    lengths = {len(values) if isinstance(values, list) else -1 for values in ratios.values()}
    if len(lengths) != 1 or min(lengths) < 2:
        raise problem("magcache.ratios.positive and .negative must be lists of the same length (one per step, >= 2)")
    numbers = [*ratios["positive"], *ratios["negative"], *coefficients] if isinstance(coefficients, list) else None
    if numbers is None or len(coefficients) != 5 or not all(
            isinstance(value, (int, float)) and math.isfinite(value) for value in numbers):
        raise problem("every ratio and the 5 teacache.coefficients must be finite numbers")
    if any(value <= 0 for value in (*ratios["positive"], *ratios["negative"])):
        raise problem("magnitude ratios must be > 0")
    details = {key: value for key, value in record.items()
               if key not in ("format", "source", "bindweave_calibrated", "magcache", "teacache")}
    return Calibration(source=str(path), bindweave_calibrated=bool(record.get("bindweave_calibrated", True)),
                       mag_ratios={side: tuple(float(v) for v in ratios[side]) for side in SIDES},
                       teacache_coefficients=tuple(float(c) for c in coefficients), details=details)


def load_calibration(path: str | None) -> Calibration:
    return PUBLISHED_WAN21_I2V_720P if path is None else read_calibration(Path(path))
