"""The stage-3 engine (bindweave/stages/engine.py): one object holds the loaded models and runs job
after job; a job is an in-memory request (files or tensors), reports its phases and steps, can be
cancelled between steps, and its failure is its own result."""

from __future__ import annotations

import threading

import pytest
import torch

from bindweave.app.config import compose_config
from bindweave.app.generate import GenerateCommand
from bindweave.app.hydra_support import close_run_log_files
from bindweave.io.inputs import load_reference_image, load_sample_hidden_states, read_meta
from bindweave.settings.sampling import SamplerSettings
from bindweave.stages import models as stage3_models
from bindweave.stages.engine import Stage3Engine
from bindweave.stages.job import Stage3Job
from support.engines import build_models
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.testing.demo import demo_meta_with_hidden_states

VIDEO = VideoSettings(height=48, width=64, num_frames=5)
SAMPLER = SamplerSettings(num_steps=3)


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    root = tiny_models.bindweave.parent
    models = build_models(ModelSettings(tiny_root=str(root), dtype="float32", device="cpu",
                                              cache_dir=str(tmp_path_factory.mktemp("cache"))))
    return Stage3Engine(models)


@pytest.fixture(scope="module")
def samples(engine, tiny_models, tmp_path_factory):
    meta = demo_meta_with_hidden_states(tmp_path_factory.mktemp("demo"), hidden_dim=engine.models.hidden_dim,
                                        qwen_folder=tiny_models.qwen)
    return {sample.sample_id: sample for sample in read_meta(meta)}


def test_a_job_of_tensors_makes_the_video_a_job_of_files_makes(engine, samples, tmp_path):
    sample = samples["demo_face_dog_house_3"]
    from_files = engine.run(Stage3Job(sample, VIDEO, SAMPLER, tmp_path / "files.mp4"))
    images = [load_reference_image(path) for path in sample.image_paths]
    positive, negative = load_sample_hidden_states(sample, hidden_dim=engine.models.hidden_dim)
    job = Stage3Job.from_request("in_memory", sample.prompt, VIDEO, SAMPLER, tmp_path / "tensors.mp4",
                                 images=images, hidden_states=(positive, negative), seed=sample.seed)
    from_tensors = engine.run(job)
    assert from_files.status == from_tensors.status == "done"
    assert (tmp_path / "files.mp4").read_bytes() == (tmp_path / "tensors.mp4").read_bytes()
    # The recipe records the in-memory inputs by content.
    assert from_tensors.record["recipe"]["hidden_states"] != from_files.record["recipe"]["hidden_states"]
    assert len(from_tensors.record["recipe"]["images"]) == len(images)


def test_progress_reports_every_phase_and_step(engine, samples, tmp_path):
    seen = []
    result = engine.run(Stage3Job(samples["demo_face_1"], VIDEO, SAMPLER, tmp_path / "v.mp4"), on_progress=seen.append)
    assert result.status == "done"
    # The sidecar says what ran for memory (this engine: encoders stay on the device, untiled decode).
    assert result.record["memory_options"] == {"offload_encoders": False, "vae_tiling": False,
                                               "dit": engine.plan.memory.record()}
    assert engine.plan.memory.mode == "resident" and "no GPU" in engine.plan.memory.reason
    assert [(update.phase, update.step) for update in seen] == [
        ("condition", 0), ("denoise", 1), ("denoise", 2), ("denoise", 3), ("decode", 3), ("write", 3), ("done", 3)]
    assert [round(update.percent) for update in seen] == [0, 33, 67, 100, 99, 99, 100]


def test_without_an_output_the_frames_come_back_and_nothing_is_written(engine, samples, tmp_path):
    result = engine.run(Stage3Job(samples["demo_face_1"], VIDEO, SAMPLER, None))
    assert result.status == "done" and result.frames.shape == (5, 48, 64, 3)
    assert list(tmp_path.iterdir()) == []


def test_cancel_between_steps_ends_the_job_cleanly_and_the_next_one_runs(engine, samples, tmp_path):
    cancel = threading.Event()

    def stop_after_two_steps(update):
        if update.phase == "denoise" and update.step == 2:
            cancel.set()

    steps_seen = []

    def count(update):
        steps_seen.append(update.step)
        stop_after_two_steps(update)

    job = Stage3Job(samples["demo_face_1"], VIDEO, SamplerSettings(num_steps=6), tmp_path / "cancelled.mp4")
    result = engine.run(job, on_progress=count, cancel=cancel)
    assert result.status == "cancelled" and "after 2 of 6 steps" in result.error
    assert max(steps_seen) == 2
    assert list(tmp_path.iterdir()) == []  # no video, no sidecar, no temp file
    assert engine.run(Stage3Job(samples["demo_face_1"], VIDEO, SAMPLER, tmp_path / "next.mp4")).status == "done"


def test_a_bad_job_is_its_own_failure(engine, samples, tmp_path):
    sample = samples["demo_face_1"]
    wrong = (torch.randn(1, 4, engine.models.hidden_dim + 1), torch.randn(1, 4, engine.models.hidden_dim + 1))
    job = Stage3Job.from_request("bad", sample.prompt, VIDEO, SAMPLER, tmp_path / "bad.mp4",
                                 images=list(sample.image_paths), hidden_states=wrong)
    result = engine.run(job)
    assert result.status == "failed" and "hidden_states[0]" in result.error
    assert engine.run(Stage3Job(sample, VIDEO, SAMPLER, tmp_path / "good.mp4")).status == "done"


def test_the_command_keeps_its_engine_across_jobs(tiny_models, tmp_path, monkeypatch):
    """Two different jobs through the app (as a multirun runs them): the models load once; a job that
    changes model.* loads again."""
    loads = []
    real_load = stage3_models.load_stage3_models
    monkeypatch.setattr(stage3_models, "load_stage3_models", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    command = GenerateCommand()
    common = [f"model.tiny_root={tiny_models.bindweave.parent}", f"model.cache_dir={tmp_path / 'cache'}",
              f"data.demo_dir={tmp_path / 'demo'}", "video.height=48", "video.width=64", "video.num_frames=5",
              "progress=false"]
    jobs = (["sampler.num_steps=2"], ["sampler.num_steps=3", "sampler.seed=7"])
    for index, extra in enumerate(jobs):
        summary = command(compose_config("generate", [*common, *extra, f"output_dir={tmp_path / f'job{index}'}"]))
        close_run_log_files()  # what run_hydra_app does after each job
        assert summary["exit_code"] == 0 and len(summary["done"]) == 3
    assert len(loads) == 1
    command(compose_config("generate", [*common, "sampler.num_steps=2", "model.dtype=bfloat16",
                                        f"output_dir={tmp_path / 'job2'}"]))
    close_run_log_files()
    assert len(loads) == 2
