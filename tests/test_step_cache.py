"""Step caching (bindweave/sampling/step_cache.py) and its calibration file (calibration.py):
threshold 0 is the exact run bit for bit, a skipped step runs no block, each CFG side keeps its
own residual, the limits hold, and a calibration round-trips while a bad file is one clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bindweave.errors import BindWeaveInputError
from bindweave.io.inputs import read_meta
from bindweave.sampling.calibration import (PUBLISHED_WAN21_I2V_720P, Calibration, calibration_record,
                                            fit_teacache, read_calibration)
from bindweave.sampling.sampler import SIDES, Step, denoise, initial_noise, make_scheduler
from bindweave.settings.sampling import CacheSettings, SamplerSettings
from bindweave.sampling.step_cache import StepCache, StepStatistics, calibration_from
from bindweave.stages.job import Stage3Job
from bindweave.stages.phases import dit_predictor, generate_sample, prepare_inputs
from support.engines import build_models
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.stages.coordinator import SingleProcess
from bindweave.testing.demo import demo_meta_with_hidden_states

VIDEO = VideoSettings(height=48, width=64, num_frames=5)
STEPS = 10


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    return build_models(ModelSettings(tiny_root=str(tiny_models.bindweave.parent), dtype="float32",
                                            device="cpu", cache_dir=str(tmp_path_factory.mktemp("cache"))))


@pytest.fixture(scope="module")
def sample(models, tiny_models, tmp_path_factory):
    meta = demo_meta_with_hidden_states(tmp_path_factory.mktemp("demo"), hidden_dim=models.hidden_dim,
                                        qwen_folder=tiny_models.qwen)
    return read_meta(meta)[0]


def final_latents(models, sample, step_cache) -> tuple[torch.Tensor, int]:
    """The latents of a whole denoise, and how many times a DiT block ran."""
    calls = []
    handles = [block.register_forward_hook(lambda *_: calls.append(1)) for block in models.transformer.blocks]
    try:
        inputs = prepare_inputs(models, sample, VIDEO)
        sampler = SamplerSettings(num_steps=STEPS)
        velocity = SingleProcess().guided_velocity(dit_predictor(models.transformer, inputs, step_cache),
                                                   sampler.guidance_scale)
        latents = denoise(initial_noise(VIDEO.latent_shape, 7), make_scheduler(sampler), velocity)
    finally:
        for handle in handles:
            handle.remove()
    return latents, len(calls)


@pytest.mark.parametrize("kind", ["magcache", "teacache"])
def test_threshold_zero_is_the_exact_run_bit_for_bit(models, sample, kind):
    exact, exact_calls = final_latents(models, sample, None)
    cache = StepCache(CacheSettings(kind=kind, threshold=0.0), STEPS)
    cached, cached_calls = final_latents(models, sample, cache)
    assert torch.equal(exact, cached)
    assert cached_calls == exact_calls == 2 * STEPS * len(models.transformer.blocks)
    assert cache.record()["forwards_skipped"] == 0


def test_a_skipped_step_runs_no_block_and_changes_the_result(models, sample):
    exact, _ = final_latents(models, sample, None)
    cache = StepCache(CacheSettings(kind="magcache"), STEPS)  # published ratios, default threshold
    cached, calls = final_latents(models, sample, cache)
    record = cache.record()
    assert record["forwards_skipped"] > 0 and record["forwards_run"] + record["forwards_skipped"] == 2 * STEPS
    assert calls == record["forwards_run"] * len(models.transformer.blocks)  # counted: skipped forwards ran none
    error = ((cached - exact).norm() / exact.norm()).item()
    assert 0 < error < 0.5, error


def drive(cache: StepCache, steps: int, blocks_of, embedding_of=lambda index: torch.zeros(6)) -> dict:
    """Call the cache as the DiT would, both sides per step; ``blocks_of(side)`` is that side's blocks."""
    outputs = {side: [] for side in SIDES}
    for index in range(steps):
        for side in SIDES:
            run = cache.for_step(Step(index, steps, torch.tensor([1.0]), side))
            outputs[side].append(run(blocks_of(side, index), torch.zeros(3), embedding_of(index)))
    return outputs


def test_each_cfg_side_reuses_its_own_residual():
    cache = StepCache(CacheSettings(kind="magcache", threshold=1.0, max_consecutive_skips=1), 6)
    offsets = {"positive": 1.0, "negative": -2.0}
    outputs = drive(cache, 6, lambda side, index: (lambda tokens: tokens + offsets[side] * (index + 1)))
    skipped = cache.record()["skipped_steps"]
    assert skipped["positive"] == skipped["negative"] and skipped["positive"]
    for side in SIDES:
        for index in skipped[side]:  # the residual of that side's last computed step (index - 1)
            assert torch.equal(outputs[side][index], torch.full((3,), offsets[side] * index))


def test_magcache_sides_decide_from_their_own_ratios():
    ratios = {"positive": (1.0,) * 10, "negative": (1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)}
    calibration = Calibration("test", True, ratios, PUBLISHED_WAN21_I2V_720P.teacache_coefficients)
    cache = StepCache(CacheSettings(kind="magcache", threshold=0.1, max_consecutive_skips=3, first_exact_steps=2),
                      10, calibration)
    drive(cache, 10, lambda side, index: (lambda tokens: tokens + 1))
    skipped = cache.record()["skipped_steps"]
    assert skipped["negative"] == []  # |1 - 0.5| is over the threshold at once
    # Ratio 1.0 adds no error: skips limited only by the window and 3 in a row.
    assert skipped["positive"] == [2, 3, 4, 6, 7, 8]


def test_limits_first_last_and_in_a_row():
    calibration = Calibration("test", True, {side: (1.0,) * 12 for side in SIDES}, (0, 0, 0, 0, 0))
    cache = StepCache(CacheSettings(kind="magcache", threshold=1.0, max_consecutive_skips=2, first_exact_steps=3,
                                    last_exact_steps=2), 12, calibration)
    drive(cache, 12, lambda side, index: (lambda tokens: tokens + 1))
    record = cache.record()
    assert record["skipped_steps"]["positive"] == [3, 4, 6, 7, 9]  # never 0-2 or 10-11, at most 2 in a row
    assert record["exact_steps"] == {"first": 3, "last": 2}


def test_teacache_skips_while_the_timestep_barely_moves_and_both_sides_alike():
    # Rescaled distance = the raw relative L1 (coefficients of x).
    calibration = Calibration("test", True, {side: (1.0,) * 8 for side in SIDES}, (0, 0, 0, 1.0, 0))
    cache = StepCache(CacheSettings(kind="teacache", threshold=0.05, max_consecutive_skips=5, first_exact_steps=1),
                      8, calibration)
    jumps = {0: 1.0, 1: 1.01, 2: 1.02, 3: 2.0, 4: 2.01, 5: 2.02, 6: 2.03, 7: 2.04}  # big change at step 3
    drive(cache, 8, lambda side, index: (lambda tokens: tokens + 1), lambda index: torch.full((6,), jumps[index]))
    skipped = cache.record()["skipped_steps"]
    assert skipped["positive"] == skipped["negative"] == [1, 2, 4, 5, 6, 7]  # step 3 moved: computed


def test_calibration_round_trips_through_its_file(tmp_path):
    statistics = StepStatistics()
    for _job in range(2):
        drive(statistics, 5, lambda side, index: (lambda tokens: tokens + (index + 1) * (2 if side == "negative" else 1)),
              lambda index: torch.full((6,), 1.0 + index))
    calibration = calibration_from(statistics, "made here", {"num_steps": 5})
    # |r_i| / |r_{i-1}| of residuals (i + 1) * c: (i + 1) / i, the same on both sides.
    assert calibration.mag_ratios["positive"] == pytest.approx((1.0, 2.0, 1.5, 4 / 3, 1.25), abs=1e-6)
    assert calibration.mag_ratios["negative"] == calibration.mag_ratios["positive"]
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration_record(calibration)))
    loaded = read_calibration(path)
    assert loaded.mag_ratios == calibration.mag_ratios
    assert loaded.teacache_coefficients == pytest.approx(calibration.teacache_coefficients)
    assert loaded.bindweave_calibrated and loaded.details["num_steps"] == 5
    assert StepCache(CacheSettings(kind="magcache", calibration=str(path)), 5).calibration == loaded


def test_published_values_are_resampled_to_the_step_count():
    ratios = PUBLISHED_WAN21_I2V_720P.ratios_for("positive", 50)
    assert len(ratios) == 50 and ratios[0] == 1.0 and ratios[-1] == PUBLISHED_WAN21_I2V_720P.mag_ratios["positive"][-1]
    assert "NOT BindWeave-calibrated" in PUBLISHED_WAN21_I2V_720P.describe()
    assert fit_teacache([0.1, 0.2, 0.3], [0.2, 0.4, 0.6]) == pytest.approx((0, 0, 0, 2.0, 0), abs=1e-9)


def good_record() -> dict:
    return calibration_record(PUBLISHED_WAN21_I2V_720P)


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("{not json", "not readable JSON"),
    (json.dumps({"format": "something else"}), "'format' is not"),
    (json.dumps({**good_record(), "magcache": {}}), "missing field"),
    (json.dumps({**good_record(), "magcache": {"ratios": {"positive": [1.0, 1.0], "negative": [1.0]}}}),
     "same length"),
    (json.dumps({**good_record(), "teacache": {"coefficients": [1, 2, 3]}}), "finite numbers"),
    (json.dumps(good_record()).replace("0.99428", "NaN"), "finite numbers"),
    (json.dumps(good_record()).replace("0.99428", "-1"), "must be > 0"),
])
def test_a_bad_calibration_file_is_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "calibration.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BindWeaveInputError) as error:
        read_calibration(path)
    message = str(error.value)
    assert f"cache.calibration={path}" in message and expected in message and "launch/calibrate.py" in message


@pytest.mark.parametrize("settings, expected", [
    (dict(kind="magcach"), "cache.kind=magcach is not one of none, magcache, teacache"),
    (dict(kind="magcache", threshold=-0.1), "cache.threshold=-0.1 must be >= 0"),
    (dict(kind="magcache", first_exact_steps=0), "cache.first_exact_steps=0 must be >= 1"),
    (dict(kind="teacache", max_consecutive_skips=-1), "cache.max_consecutive_skips=-1 must be >= 0"),
])
def test_bad_cache_settings_are_refused(settings, expected):
    with pytest.raises(BindWeaveInputError, match=expected):
        CacheSettings(**settings)


def test_defaults_are_the_papers(tmp_path):
    assert CacheSettings(kind="magcache").resolved_threshold == 0.12
    assert CacheSettings(kind="teacache").resolved_threshold == 0.2
    assert CacheSettings(kind="magcache").exact_window(50) == (10, 50)  # a fifth of the steps exact
    assert not math.isnan(CacheSettings().resolved_threshold)


def test_the_sidecar_records_what_was_skipped(models, sample, tmp_path):
    job = Stage3Job(sample, VIDEO, SamplerSettings(num_steps=STEPS), tmp_path / "v.mp4",
                    cache=CacheSettings(kind="magcache"))
    record = generate_sample(models, job, progress=False)
    cache = record["speed"]["step_cache"]
    assert cache["kind"] == "magcache" and cache["forwards_skipped"] > 0
    assert set(cache["skipped_steps"]) == set(SIDES) and "NOT BindWeave-calibrated" in cache["calibration"]
    assert record["speed"]["fp8_linears"] == {"count": 0, "layers": []}
    assert record["recipe"]["model_options"]["cache"]["kind"] == "magcache"
    assert (tmp_path / "v.latents.safetensors").is_file()
